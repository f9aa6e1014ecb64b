# timer: takes 10 interrupts from the PIT (through the in-kernel PIC, IRQ 0
# remapped to vector 0x20), halting between them, prints "ticks 10" and
# resets. Exercises the IDT, the PIC, the PIT and HLT with interrupts on.
    .code64
    .globl _start
    idt = 0x1000
    vector = 0x20
_start:
    # IDT entry for the timer vector: a 64-bit interrupt gate to `tick`.
    lea     tick(%rip), %rax
    mov     $(idt + vector * 16), %rdi
    mov     %ax, (%rdi)                 # offset 15..0
    movw    $0x08, 2(%rdi)              # code selector
    movw    $0x8e00, 4(%rdi)            # present, DPL 0, interrupt gate
    shr     $16, %rax
    mov     %ax, 6(%rdi)                # offset 31..16
    shr     $16, %rax
    mov     %eax, 8(%rdi)               # offset 63..32
    movl    $0, 12(%rdi)
    lidt    idt_pointer(%rip)

    # PIC: IRQs 0-7 at vectors 0x20-0x27, 8-15 at 0x28-0x2f; only IRQ 0 on.
    mov     $0x11, %al
    out     %al, $0x20
    out     %al, $0xa0
    mov     $0x20, %al
    out     %al, $0x21
    mov     $0x28, %al
    out     %al, $0xa1
    mov     $0x04, %al
    out     %al, $0x21
    mov     $0x02, %al
    out     %al, $0xa1
    mov     $0x01, %al
    out     %al, $0x21
    out     %al, $0xa1
    mov     $0xfe, %al
    out     %al, $0x21
    mov     $0xff, %al
    out     %al, $0xa1

    # PIT channel 0, mode 2, 1193 ticks of 1.193182 MHz: about 1 kHz.
    mov     $0x34, %al
    out     %al, $0x43
    mov     $(1193 & 0xff), %al
    out     %al, $0x40
    mov     $(1193 >> 8), %al
    out     %al, $0x40

    sti
wait:
    hlt
    cmpq    $10, ticks(%rip)
    jb      wait
    cli

    lea     message(%rip), %rsi
    mov     $message_len, %rcx
print:
    mov     $0x3fd, %dx
busy:
    in      %dx, %al
    test    $0x20, %al
    jz      busy
    mov     $0x3f8, %dx
    mov     (%rsi), %al
    out     %al, %dx
    inc     %rsi
    dec     %rcx
    jnz     print
    mov     $0xfe, %al
    out     %al, $0x64
halt:
    hlt
    jmp     halt

tick:
    push    %rax
    incq    ticks(%rip)
    mov     $0x20, %al                  # end of interrupt
    out     %al, $0x20
    pop     %rax
    iretq

    .align 8
ticks:
    .quad   0
idt_pointer:
    .word   256 * 16 - 1
    .quad   idt
message:
    .ascii  "ticks 10\n"
    message_len = . - message
