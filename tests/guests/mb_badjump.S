# A Multiboot kernel for livemig's tests that prints "jumping" on COM1 and jumps to
# 0xfec00000, where there is neither RAM nor a device: KVM cannot fetch an instruction
# there, and the machine must stop in run state internal-error.

        .text
        .code32
        .globl _start
_start:
        jmp entry
        .p2align 2
        .long 0x1BADB002, 0, -0x1BADB002

        .include "com1.inc"

entry:
        movl $0x7c00, %esp
        movl $msg, %esi
        call puts
        movl $0xfec00000, %eax
        jmp *%eax

        .data
msg:    .asciz "jumping\r\n"
