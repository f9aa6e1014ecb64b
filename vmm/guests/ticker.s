# ticker: touches 64 MiB of memory once (one word per page from 4 MiB on),
# then prints "." on the serial port every 4096 loop turns, forever. The
# benchmark snapshots it and measures how soon a restored VM prints again.
    .code64
    .globl _start
    base = 0x400000
    pages = (64 << 20) / 4096
_start:
    mov     $base, %rdi
    mov     $pages, %rcx
touch:
    mov     %rcx, (%rdi)
    add     $4096, %rdi
    dec     %rcx
    jnz     touch
tick:
    xor     %rbx, %rbx
spin:
    inc     %rbx
    test    $0xfff, %rbx
    jnz     spin
    mov     $0x3fd, %dx
busy:
    in      %dx, %al
    test    $0x20, %al
    jz      busy
    mov     $0x3f8, %dx
    mov     $'.', %al
    out     %al, %dx
    jmp     tick
