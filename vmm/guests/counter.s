# counter: counts to 2^18, storing each count in a 512 KiB ring at 3 MiB
# (word count % 65536 = count xor K) and announcing every 4096th count on
# port 0x80, so the VMM can stop it mid-run. At the end it prints the count
# and the sum of the ring as hex, then resets. A run that is snapshotted
# and restored midway must print exactly what an uninterrupted run prints.
    .code64
    .globl _start
    ring = 0x300000
    target = 1 << 18
_start:
    movabs  $0x9e3779b97f4a7c15, %r9
    xor     %rbx, %rbx                  # the count
count:
    inc     %rbx
    mov     %rbx, %rax
    and     $0xffff, %rax
    mov     %rbx, %rdx
    xor     %r9, %rdx
    mov     %rdx, ring(,%rax,8)
    test    $0xfff, %rbx
    jnz     more
    mov     %bl, %al
    out     %al, $0x80                  # a point where the VMM may stop us
more:
    cmp     $target, %rbx
    jb      count

    mov     %rbx, %r8
    call    print_hex
    mov     $' ', %al
    call    putc
    xor     %r8, %r8
    mov     $ring, %rdi
    mov     $0x10000, %rcx
sum:
    add     (%rdi), %r8
    add     $8, %rdi
    dec     %rcx
    jnz     sum
    call    print_hex
    mov     $'\n', %al
    call    putc
    jmp     reset

    .include "serial.inc"
