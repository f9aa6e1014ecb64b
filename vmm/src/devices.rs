//! Legacy devices on port I/O: the 8250 serial port at `0x3f8` (IRQ 4),
//! written to a log, and the i8042 controller, whose reset command (`0xfe`
//! to port `0x64`) ends the VM.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// First port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Its eight registers.
pub const SERIAL_PORTS: std::ops::Range<u16> = SERIAL_PORT..SERIAL_PORT + 8;
/// Its interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data and command/status ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
const I8042_RESET: u8 = 0xfe;

/// Raises the serial interrupt by writing an event descriptor that KVM
/// injects as IRQ 4 (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port with its output.
pub struct SerialPort {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> SerialPort {
        SerialPort {
            serial: Serial::new(IrqTrigger(interrupt), out),
        }
    }

    pub fn write(&mut self, port: u16, value: u8) -> Result<()> {
        self.serial
            .write((port - SERIAL_PORT) as u8, value)
            .map_err(|e| Error::Serial(format!("{e:?}")))
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.serial.read((port - SERIAL_PORT) as u8)
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

/// What a write to the i8042 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Write {
    Reset,
    Ignored,
}

/// The i8042, as far as a VM needs it: reset, and "no data" on reads.
pub fn i8042_write(port: u16, value: u8) -> I8042Write {
    if port == I8042_COMMAND && value == I8042_RESET {
        I8042Write::Reset
    } else {
        I8042Write::Ignored
    }
}

/// Status register: output buffer empty, input buffer empty.
pub fn i8042_read(_port: u16) -> u8 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_output() {
        let out = Shared::default();
        let mut serial = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for byte in b"hi\n" {
            serial.write(SERIAL_PORT, *byte).unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Line status: transmitter empty.
        assert_ne!(serial.read(SERIAL_PORT + 5) & 0x20, 0);
    }

    #[test]
    fn only_the_reset_command_resets() {
        assert_eq!(i8042_write(I8042_COMMAND, 0xfe), I8042Write::Reset);
        assert_eq!(i8042_write(I8042_COMMAND, 0xd1), I8042Write::Ignored);
        assert_eq!(i8042_write(I8042_DATA, 0xfe), I8042Write::Ignored);
    }
}
