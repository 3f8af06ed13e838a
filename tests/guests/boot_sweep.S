# A BIOS-style boot sector for livemig's tests (512 bytes, loaded at 0x7c00).
#
# Real mode: report DL (the boot drive) on COM1, open A20 through port 0x92, load a GDT,
# enter flat 32-bit protected mode. Then sweep pages for ever: sweep s (s = 1, 2, ...)
# stores the u32 s at offset 0 of every page of [SWEEP_START, SWEEP_END), in address
# order, with %ebx = s and %esi = the page being written; after each sweep it prints
# "sweep <s in hex>" on COM1. So at any moment the pages below %esi hold s and the rest
# s - 1, and the serial output is the sweeps completed, in order.

        .set SWEEP_START, 0x00100000
        .set SWEEP_END,   0x01100000          # 16 MiB

        .code16
        .globl _start
_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x7c00, %sp
        movb %dl, %bl
        movw $msg_boot, %si
        call puts16
        movb %bl, %al
        shrb $4, %al
        call hex16
        movb %bl, %al
        call hex16
        movw $msg_nl, %si
        call puts16
        inb $0x92, %al                    # fast A20
        orb $0x02, %al
        andb $0xfe, %al
        outb %al, $0x92
        lgdtl gdt_desc
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x08, $pm32

hex16:                                    # low nibble of %al as a hex digit
        andb $0x0f, %al
        addb $'0', %al
        cmpb $'9', %al
        jbe putc16
        addb $('a' - '9' - 1), %al
putc16:                                   # %al, polled
        movw $0x3fd, %dx
        movb %al, %ah
1:      inb %dx, %al
        testb $0x20, %al
        jz 1b
        movb %ah, %al
        movw $0x3f8, %dx
        outb %al, %dx
        ret
puts16:                                   # zero-terminated string at %si
        lodsb
        testb %al, %al
        jz 2f
        call putc16
        jmp puts16
2:      ret

        .code32
pm32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $0x7c00, %esp
        movl $1, %ebx
sweep:
        movl $SWEEP_START, %esi
page:
        movl %ebx, (%esi)
        addl $4096, %esi
        cmpl $SWEEP_END, %esi
        jb page
        movl %ebx, %edx                   # "sweep XXXXXXXX\r\n"
        movl $msg_sweep, %edi
        call puts32
        movl $8, %ecx
3:      roll $4, %edx
        movb %dl, %al
        andb $0x0f, %al
        addb $'0', %al
        cmpb $'9', %al
        jbe 4f
        addb $('a' - '9' - 1), %al
4:      call putc32
        loop 3b
        movl $msg_nl, %edi
        call puts32
        incl %ebx
        jmp sweep

putc32:
        pushl %edx
        movb %al, %ah
        movw $0x3fd, %dx
5:      inb %dx, %al
        testb $0x20, %al
        jz 5b
        movb %ah, %al
        movw $0x3f8, %dx
        outb %al, %dx
        popl %edx
        ret
puts32:                                   # zero-terminated string at %edi
        movb (%edi), %al
        testb %al, %al
        jz 6f
        call putc32
        incl %edi
        jmp puts32
6:      ret

msg_boot:  .asciz "boot sector: DL="
msg_nl:    .asciz "\r\n"
msg_sweep: .asciz "sweep "

        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff          # 0x08: flat 32-bit code
        .quad 0x00cf92000000ffff          # 0x10: flat 32-bit data
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .org 510
        .byte 0x55, 0xaa
