# virtio_blk: drives the virtio-blk device in slot 0 (0xd0000000, IRQ 5):
# prints its capacity, writes a pattern (byte i = 3 + 7 i) to sector 1,
# reads sector 0 and prints its first 16 bytes and the sum of its 64
# words, flushes, asks for the drive id, reads past the end, and says
# whether the device's interrupts arrived; each with its status byte. On
# a read-only drive the write's status is 01 (VIRTIO_BLK_S_IOERR).
    .code64
    .globl _start
    .include "macros.inc"
_start:
    call    setup
    mov     $1, %r12d
    call    device_init

    say     capacity_text
    mov     0x104(%rbx), %eax           # capacity, high half
    shl     $32, %rax
    mov     0x100(%rbx), %ecx
    or      %rcx, %rax
    mov     %rax, %r15
    mov     %rax, %r8
    mov     $16, %ecx
    call    print_digits
    say     newline

    mov     $3, %al
    xor     %ecx, %ecx
fill:
    mov     %al, data(%rcx)
    add     $7, %al
    inc     %ecx
    cmp     $512, %ecx
    jb      fill
    mov     $1, %eax                    # VIRTIO_BLK_T_OUT
    mov     $1, %r8d
    mov     $512, %edx
    xor     %r13d, %r13d
    call    request
    push    %rax
    say     write_text
    pop     %r8
    call    print_status

    xor     %eax, %eax                  # VIRTIO_BLK_T_IN
    xor     %r8d, %r8d
    mov     $512, %edx
    mov     $2, %r13d
    call    request
    push    %rax
    say     read_text
    pop     %r8
    mov     $2, %ecx
    call    print_digits
    say     space
    mov     $data, %esi
    mov     $16, %ecx
    call    print
    say     space
    xor     %r8, %r8
    mov     $data, %esi
    mov     $64, %ecx
sum:
    add     (%rsi), %r8
    add     $8, %rsi
    dec     %ecx
    jnz     sum
    mov     $16, %ecx
    call    print_digits
    say     newline

    mov     $4, %eax                    # VIRTIO_BLK_T_FLUSH
    xor     %r8d, %r8d
    xor     %edx, %edx
    call    request
    push    %rax
    say     flush_text
    pop     %r8
    call    print_status

    mov     $8, %eax                    # VIRTIO_BLK_T_GET_ID
    xor     %r8d, %r8d
    mov     $20, %edx
    mov     $2, %r13d
    call    request
    push    %rax
    say     id_text
    pop     %r8
    mov     $2, %ecx
    call    print_digits
    say     space
    mov     $data, %esi
    mov     $20, %ecx
id_char:
    mov     (%rsi), %al
    test    %al, %al
    jz      id_done
    call    putc
    inc     %rsi
    dec     %ecx
    jnz     id_char
id_done:
    say     newline

    xor     %eax, %eax                  # a read of the sector past the end
    mov     %r15, %r8
    mov     $512, %edx
    mov     $2, %r13d
    call    request
    push    %rax
    say     range_text
    pop     %r8
    call    print_status

    call    await_irq
    say     interrupts_text
    cmpq    $0, irqs(%rip)
    je      no_interrupts
    say     yes_text
    jmp     reset
no_interrupts:
    say     no_text
    jmp     reset

# print_status: prints %r8's low byte in hex and a newline.
print_status:
    mov     $2, %ecx
    call    print_digits
    say     newline
    ret

    .include "virtio.inc"
    .include "serial.inc"
    .include "blk.inc"
    text    capacity_text, "capacity "
    text    write_text, "write "
    text    read_text, "read "
    text    flush_text, "flush "
    text    id_text, "id "
    text    range_text, "range "
    text    interrupts_text, "interrupts "
    text    yes_text, "yes\n"
    text    no_text, "no\n"
