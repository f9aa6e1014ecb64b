# virtio_blk_many: writes sectors 2 to 129 of the virtio-blk device in
# slot 0, one request each (word i of sector s = s << 32 | i), then reads
# them back and prints "wrote 128 sum " and the sum of every word read.
# A snapshot taken between (or during) its requests and restored must
# print the same sum, and the disk must hold every sector.
    .code64
    .globl _start
    .include "macros.inc"
    first = 2
    end = 130
_start:
    call    setup
    mov     $1, %r12d
    call    device_init

    mov     $first, %r15d
write_next:
    xor     %ecx, %ecx
    mov     %r15, %rax
    shl     $32, %rax
fill:
    mov     %rax, data(,%rcx,8)
    inc     %rax
    inc     %ecx
    cmp     $64, %ecx
    jb      fill
    mov     $1, %eax                    # VIRTIO_BLK_T_OUT
    mov     %r15, %r8
    mov     $512, %edx
    xor     %r13d, %r13d
    call    request
    test    %eax, %eax
    jnz     failed
    inc     %r15
    cmp     $end, %r15
    jb      write_next

    xor     %r12, %r12
    mov     $first, %r15d
read_next:
    xor     %eax, %eax                  # VIRTIO_BLK_T_IN
    mov     %r15, %r8
    mov     $512, %edx
    mov     $2, %r13d
    call    request
    test    %eax, %eax
    jnz     failed
    mov     $data, %esi
    mov     $64, %ecx
sum:
    add     (%rsi), %r12
    add     $8, %rsi
    dec     %ecx
    jnz     sum
    inc     %r15
    cmp     $end, %r15
    jb      read_next

    say     wrote_text
    mov     %r12, %r8
    mov     $16, %ecx
    call    print_digits
    say     newline
    jmp     reset
failed:
    push    %rax
    say     failed_text
    mov     %r15, %r8
    mov     $4, %ecx
    call    print_digits
    say     space
    pop     %r8
    mov     $2, %ecx
    call    print_digits
    say     newline
    jmp     reset

    .include "virtio.inc"
    .include "serial.inc"
    .include "blk.inc"
    text    wrote_text, "wrote 128 sum "
    text    failed_text, "failed at sector "
