//! The devices every vCPU thread reaches through its exits, and the legacy
//! devices on port I/O: the 8250 serial port at `0x3f8` (IRQ 4), written to
//! a log, and the i8042 controller, whose reset command (`0xfe` to port
//! `0x64`) ends the VM.

use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::persist::Persist;

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

/// What a port write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortWrite {
    Done,
    /// The guest asked the i8042 to reset the CPU.
    Reset,
}

/// The devices of one VM, shared by its vCPU threads: each exit locks only
/// the device it is for.
pub struct Devices {
    serial: Mutex<SerialPort>,
    /// The virtio-mmio devices, each behind its own lock.
    pub(crate) virtio: crate::virtio::Devices,
}

impl Devices {
    pub fn new(serial: SerialPort, virtio: crate::virtio::Devices) -> Devices {
        Devices {
            serial: Mutex::new(serial),
            virtio,
        }
    }

    fn serial(&self) -> MutexGuard<'_, SerialPort> {
        self.serial.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guest's `out` to `port`.
    pub fn port_write(&self, port: u16, data: &[u8]) -> Result<PortWrite> {
        let value = data.first().copied().unwrap_or(0);
        if SERIAL_PORTS.contains(&port) {
            self.serial().write(port, value)?;
        } else if (port == I8042_COMMAND || port == I8042_DATA)
            && i8042_write(port, value) == I8042Write::Reset
        {
            return Ok(PortWrite::Reset);
        }
        Ok(PortWrite::Done)
    }

    /// A guest's `in` from `port`: ports without a device read as all ones.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        let value = if SERIAL_PORTS.contains(&port) {
            self.serial().read(port)
        } else if port == I8042_COMMAND || port == I8042_DATA {
            i8042_read(port)
        } else {
            0xff
        };
        data.fill(value);
    }

    /// A guest's read of an address no memory backs: a virtio device's
    /// register, or all ones where there is no device, as on a real bus.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.virtio.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// A guest's write to an address no memory backs: to a virtio
    /// device's register, or ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.virtio.mmio_write(addr, data);
    }

    pub fn flush(&self) {
        self.serial().flush();
    }

    /// The serial port's state, for a snapshot.
    pub fn save_serial(&self) -> Result<SerialSaved> {
        self.serial().save()
    }

    /// Puts the serial port back as `saved` describes it, keeping its
    /// interrupt and output.
    pub fn restore_serial(&self, saved: &SerialSaved) -> Result<()> {
        let mut port = self.serial();
        let interrupt = port
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(Error::EventFd)?;
        // A failed restore drops the output with the machine it was for.
        let out = std::mem::replace(port.serial.writer_mut(), Box::new(std::io::sink()));
        *port = SerialPort::restore((interrupt, out), saved)?;
        Ok(())
    }
}

/// The 8250's registers and unread input, as saved in a snapshot (the
/// same fields as vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSaved {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Builds `$to` from the same-named registers of `$from` and the input
/// `$in_buffer`: the one list of the 8250's fields, for both directions.
macro_rules! serial_registers {
    ($to:ident, $from:expr, $in_buffer:expr) => {
        $to {
            baud_divisor_low: $from.baud_divisor_low,
            baud_divisor_high: $from.baud_divisor_high,
            interrupt_enable: $from.interrupt_enable,
            interrupt_identification: $from.interrupt_identification,
            line_control: $from.line_control,
            line_status: $from.line_status,
            modem_control: $from.modem_control,
            modem_status: $from.modem_status,
            scratch: $from.scratch,
            in_buffer: $in_buffer,
        }
    };
}

impl From<SerialState> for SerialSaved {
    fn from(s: SerialState) -> SerialSaved {
        serial_registers!(SerialSaved, s, s.in_buffer)
    }
}

impl From<&SerialSaved> for SerialState {
    fn from(s: &SerialSaved) -> SerialState {
        serial_registers!(SerialState, s, s.in_buffer.clone())
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

impl Persist<'_> for SerialPort {
    type State = SerialSaved;
    /// The interrupt's event descriptor and where the output goes.
    type ConstructorArgs = (EventFd, Box<dyn Write + Send>);
    type Error = Error;

    fn save(&self) -> Result<SerialSaved> {
        Ok(SerialSaved::from(self.serial.state()))
    }

    fn restore((interrupt, out): Self::ConstructorArgs, saved: &SerialSaved) -> Result<Self> {
        let serial = Serial::from_state(&saved.into(), IrqTrigger(interrupt), NoEvents, out)
            .map_err(|e| Error::Snapshot(format!("the saved serial port is invalid: {e:?}")))?;
        Ok(SerialPort { serial })
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
    fn a_serial_port_restored_from_its_state_has_its_registers_input_and_a_new_output() {
        let mut serial = SerialPort::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        // Divisor latch on, a divisor of 3, 8N1, interrupts on, scratch.
        for (offset, value) in [(3, 0x83), (0, 3), (1, 0), (3, 0x03), (1, 0x01), (7, 0x5a)] {
            serial.write(SERIAL_PORT + offset, value).unwrap();
        }
        serial.serial.enqueue_raw_bytes(b"ls\n").unwrap();
        let saved = serial.save().unwrap();
        assert_eq!(saved.in_buffer, b"ls\n");

        let out = Shared::default();
        let mut restored =
            SerialPort::restore((EventFd::new(0).unwrap(), Box::new(out.clone())), &saved).unwrap();
        assert_eq!(restored.save().unwrap(), saved);
        assert_eq!(restored.read(SERIAL_PORT + 7), 0x5a);
        assert_eq!(restored.read(SERIAL_PORT), b'l', "the unread input is kept");
        restored.write(SERIAL_PORT, b'x').unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"x");
    }

    #[test]
    fn only_the_reset_command_resets() {
        assert_eq!(i8042_write(I8042_COMMAND, 0xfe), I8042Write::Reset);
        assert_eq!(i8042_write(I8042_COMMAND, 0xd1), I8042Write::Ignored);
        assert_eq!(i8042_write(I8042_DATA, 0xfe), I8042Write::Ignored);
    }
}
