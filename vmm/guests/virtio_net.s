# virtio_net: drives the virtio-net device in slot 0 (0xd0000000, IRQ 5):
# prints the MAC from its configuration space, posts one receive buffer,
# sends one broadcast frame (ethertype 0x88b5, payload "wrenn guest
# frame") and waits for a frame of that ethertype to come back (frames
# of other types are skipped), printing its payload.
    .code64
    .globl _start
    .include "macros.inc"
    rxbuf = 0x400000
    txbuf = 0x401000
    header = 12                         # virtio_net_hdr_v1
_start:
    call    setup
    mov     $2, %r12d
    call    device_init

    say     mac_text
    xor     %r15d, %r15d
mac_byte:
    movzbl  0x100(%rbx,%r15), %r8d      # config: mac[i], one byte wide
    mov     $2, %ecx
    call    print_digits
    inc     %r15d
    cmp     $6, %r15d
    je      mac_done
    mov     $':', %al
    call    putc
    jmp     mac_byte
mac_done:
    say     newline

    xor     %r9d, %r9d                  # receive queue: one 2 KiB buffer
    mov     $rxbuf, %eax
    mov     $2048, %edx
    mov     $2, %r10d                   # WRITE
    xor     %r11d, %r11d
    xor     %ecx, %ecx
    call    descriptor
    xor     %eax, %eax
    call    submit
    mov     %edx, %r15d                 # the used index to wait for

    movq    $0, txbuf                   # the header: no offloads
    movl    $0, txbuf + 8
    movl    $0xffffffff, txbuf + header # to everyone
    movw    $0xffff, txbuf + header + 4
    mov     0x100(%rbx), %eax           # from our MAC
    mov     %eax, txbuf + header + 6
    mov     0x104(%rbx), %eax
    mov     %ax, txbuf + header + 10
    movw    $0xb588, txbuf + header + 12 # ethertype 0x88b5
    lea     tx_payload(%rip), %rsi
    mov     $(txbuf + header + 14), %edi
    mov     $tx_payload_len, %ecx
copy:
    mov     (%rsi), %al
    mov     %al, (%rdi)
    inc     %rsi
    inc     %rdi
    dec     %ecx
    jnz     copy
    mov     $1, %r9d                    # transmit queue
    mov     $txbuf, %eax
    mov     $(header + 14 + tx_payload_len), %edx
    xor     %r10d, %r10d
    xor     %r11d, %r11d
    xor     %ecx, %ecx
    call    descriptor
    xor     %eax, %eax
    call    submit
    call    wait_used
    say     sent_text

receive:
    xor     %r9d, %r9d
    mov     %r15d, %edx
    call    wait_used
    cmpw    $0xb588, rxbuf + header + 12
    je      received
    xor     %r9d, %r9d                  # not ours: post the buffer again
    xor     %eax, %eax
    call    submit
    mov     %edx, %r15d
    jmp     receive
received:
    sub     $(header + 14), %eax
    mov     %eax, %r14d
    say     got_text
    mov     $(rxbuf + header + 14), %esi
    mov     %r14d, %ecx
    call    print
    say     newline

    call    await_irq
    say     interrupts_text
    cmpq    $0, irqs(%rip)
    je      no_interrupts
    say     yes_text
    jmp     reset
no_interrupts:
    say     no_text
    jmp     reset

    .include "virtio.inc"
    .include "serial.inc"
    text    tx_payload, "wrenn guest frame"
    text    mac_text, "mac "
    text    sent_text, "sent\n"
    text    got_text, "got "
    text    interrupts_text, "interrupts "
    text    yes_text, "yes\n"
    text    no_text, "no\n"
