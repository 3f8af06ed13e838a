# A boot sector for livemig's tests that prints "halted" on COM1 and halts with
# interrupts off: nothing can wake it but a reset.

        .code16
        .globl _start
_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw $msg, %si
1:      lodsb
        testb %al, %al
        jz 3f
        movb %al, %bl
        movw $0x3fd, %dx
2:      inb %dx, %al
        testb $0x20, %al
        jz 2b
        movb %bl, %al
        movw $0x3f8, %dx
        outb %al, %dx
        jmp 1b
3:      hlt
        jmp 3b
msg:    .asciz "halted\r\n"
        .org 510
        .byte 0x55, 0xaa
