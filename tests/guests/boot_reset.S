# A boot sector for livemig's tests that resets its machine by a triple fault, once.
#
# It counts its boots in the word at 0x600 (memory survives a reset; the boot sector is
# loaded again), prints "boot <n>" on COM1, and on the first boot enters 32-bit protected
# mode with an empty IDT and divides by zero: no vector for the fault, none for the double
# fault either, so the CPU shuts down and the machine resets, as a PC does. On the second
# boot it halts.

        .code16
        .globl _start
_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %ss
        movw $0x7c00, %sp
        incw 0x600
        movw $msg, %si
        call puts
        movb 0x600, %al
        addb $'0', %al
        call putc
        movw $nl, %si
        call puts
        cmpw $2, 0x600
        jae 1f
        lgdtl gdt_desc
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x08, $pm32
1:      hlt
        jmp 1b

        .code32
pm32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %ss
        lidt idt_empty
        xorl %eax, %eax
        divl %eax
        .code16

putc:
        movb %al, %bl
        movw $0x3fd, %dx
2:      inb %dx, %al
        testb $0x20, %al
        jz 2b
        movb %bl, %al
        movw $0x3f8, %dx
        outb %al, %dx
        ret
puts:
        lodsb
        testb %al, %al
        jz 3f
        call putc
        jmp puts
3:      ret

msg:    .asciz "boot "
nl:     .asciz "\r\n"
idt_empty:
        .word 0
        .long 0
        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
        .org 510
        .byte 0x55, 0xaa
