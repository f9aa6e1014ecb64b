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

    mov     $16, %rcx
digit:
    rol     $4, %r8
    mov     %r8, %rax
    and     $0xf, %rax
    cmp     $10, %al
    jb      decimal
    add     $('a' - 10 - '0'), %al
decimal:
    add     $'0', %al
    call    putc
    dec     %rcx
    jnz     digit
    mov     $'\n', %al
    call    putc
    mov     $0xfe, %al
    out     %al, $0x64
halt:
    hlt
    jmp     halt

# putc: writes %al to the serial port once it can take it.
putc:
    mov     %al, %ah
    mov     $0x3fd, %dx
busy:
    in      %dx, %al
    test    $0x20, %al
    jz      busy
    mov     $0x3f8, %dx
    mov     %ah, %al
    out     %al, %dx
    ret
