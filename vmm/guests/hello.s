# hello: prints a line on the serial port, then resets through the i8042.
# Entered in 64-bit mode at 0x100000 with a stack (see vmm/src/boot.rs).
    .code64
    .globl _start
_start:
    lea     message(%rip), %rsi
    mov     $message_len, %rcx
next:
    mov     $0x3fd, %dx             # line status register
wait:
    in      %dx, %al
    test    $0x20, %al              # transmitter holding register empty?
    jz      wait
    mov     $0x3f8, %dx
    mov     (%rsi), %al
    out     %al, %dx
    inc     %rsi
    dec     %rcx
    jnz     next
    mov     $0xfe, %al              # i8042: pulse the reset line
    out     %al, $0x64
halt:
    hlt
    jmp     halt

message:
    .ascii  "hello from a wrenn-vmm guest\n"
    message_len = . - message
