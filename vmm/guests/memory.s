# memory: fills 1 MiB at 2 MiB with a sequence (word i = (i + 1) * K), sums
# it back, prints the sum as 16 hex digits and a newline, then resets.
# The host checks both the printed sum and the words in guest memory.
    .code64
    .globl _start
    base = 0x200000
    words = (1 << 20) / 8
_start:
    movabs  $0x9e3779b97f4a7c15, %rax
    mov     $base, %rdi
    mov     $words, %rcx
    xor     %rbx, %rbx
fill:
    add     %rax, %rbx
    mov     %rbx, (%rdi)
    add     $8, %rdi
    dec     %rcx
    jnz     fill

    mov     $base, %rdi
    mov     $words, %rcx
    xor     %r8, %r8
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
