# smp: every vCPU starts here, each on its own stack. Each sets its bit in a
# mask (its APIC ID from CPUID leaf 1); application processors then count in
# their own slot forever. The bootstrap processor waits for every bit (the
# number of logical processors also comes from CPUID leaf 1), prints
# "cpus <mask>", then counts in slot 0 until every AP's count has reached
# the threshold the host wrote at `threshold` (0: it never stops), prints
# "ok" and resets.
    .code64
    .globl _start
    mask = 0x200000
    threshold = 0x200010
    ticks = 0x200040                    # a u64 per vCPU, by APIC ID
_start:
    mov     $1, %eax
    cpuid
    mov     %ebx, %esi
    shr     $24, %esi                   # APIC ID
    mov     %ebx, %edi
    shr     $16, %edi
    and     $0xff, %edi                 # logical processors
    lock btsq %rsi, mask
    test    %esi, %esi
    jz      bsp
ap:
    lock incq ticks(,%rsi,8)
    jmp     ap

bsp:
    mov     $1, %rbx
    mov     %edi, %ecx
    shl     %cl, %rbx
    dec     %rbx                        # every vCPU's bit
wait_all:
    pause
    cmp     mask, %rbx
    jne     wait_all
    lea     cpus(%rip), %rsi
    call    puts
    mov     mask, %r8
    call    print_hex
    mov     $'\n', %al
    call    putc

count:
    incq    ticks
    mov     threshold, %rax
    test    %rax, %rax
    jz      count
    mov     $1, %rcx
check:
    cmp     %rdi, %rcx
    jae     done
    cmp     %rax, ticks(,%rcx,8)
    jb      count
    inc     %rcx
    jmp     check
done:
    lea     ok(%rip), %rsi
    call    puts
    jmp     reset

cpus:
    .asciz  "cpus "
ok:
    .asciz  "ok\n"

    .include "serial.inc"
