# A Multiboot kernel for livemig's tests: reports what the loader told it, then sweeps.
#
# At entry it checks EAX = 0x2BADB002 and prints, on COM1, the Multiboot information
# EBX points at: flags, mem_lower, mem_upper, the command line, the loader's name and
# every memory map entry (low 32 bits of base and length, and the type). It reads an
# unassigned port (0x2f8, where no COM2 is) and an address with neither RAM nor a device
# (0xfec00000) and prints what came back. Then it sweeps for ever: sweep s (s = 1, 2, ...)
# stores s XOR the page's address at offset 0 of every page of [SWEEP_START, SWEEP_END),
# in address order, with %ebx = s and %edi = the page being written, and prints
# "sweep <s>" after each. So pages below %edi hold s ^ address, the rest (s-1) ^ address.
#
# Assembled with --defsym AOUT=1 and linked as a flat binary, the header carries the load
# addresses (flag 16, the "a.out kludge") and the file is no ELF at all.

        .set MB_MAGIC, 0x1BADB002
        .ifdef AOUT
        .set MB_FLAGS, 0x00010003
        .else
        .set MB_FLAGS, 0x00000003
        .endif
        .set SWEEP_START, 0x00400000
        .set SWEEP_END,   0x01400000        # 16 MiB

        .text
        .code32
        .globl _start
_start:
        jmp entry
        .p2align 2
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        .ifdef AOUT
        .long mb_header, _start, _edata, _end, entry
        .endif

        .include "com1.inc"

# putfield: the string at %esi, then %eax in hex, then a space.
putfield:
        call puts
        call puthex
        call putsp
        ret

entry:
        cli
        movl $stack_top, %esp
        movl %eax, %ecx
        movl $msg_magic, %esi
        call puts
        movl %ecx, %eax
        call puthex
        call putnl
        cmpl $0x2BADB002, %ecx
        jne halt
        movl %ebx, %ebp                     # the Multiboot information
        movl $msg_flags, %esi
        movl 0(%ebp), %eax
        call putfield
        movl $msg_lower, %esi
        movl 4(%ebp), %eax
        call putfield
        movl $msg_upper, %esi
        movl 8(%ebp), %eax
        call putfield
        call putnl
        testl $0x4, 0(%ebp)
        jz 1f
        movl $msg_cmdline, %esi
        call puts
        movl 16(%ebp), %esi
        call puts
        call putnl
1:      testl $0x200, 0(%ebp)
        jz 2f
        movl $msg_loader, %esi
        call puts
        movl 64(%ebp), %esi
        call puts
        call putnl
2:      testl $0x40, 0(%ebp)
        jz 4f
        movl 48(%ebp), %edi                 # mmap_addr: each entry is size, base, length, type
        movl %edi, %edx
        addl 44(%ebp), %edx                 # + mmap_length
3:      cmpl %edx, %edi
        jae 4f
        movl $msg_mmap, %esi
        movl 4(%edi), %eax                  # base, low 32 bits
        call putfield
        movl $msg_len, %esi
        movl 12(%edi), %eax                 # length, low 32 bits
        call putfield
        movl $msg_type, %esi
        movl 20(%edi), %eax
        call putfield
        call putnl
        addl (%edi), %edi
        addl $4, %edi
        jmp 3b
4:      xorl %eax, %eax
        movw $0x2f8, %dx
        inb %dx, %al
        movl $msg_port, %esi
        call putfield
        movl 0xfec00000, %eax
        movl $msg_mmio, %esi
        call putfield
        call putnl

        movl $1, %ebx
sweep:
        movl $SWEEP_START, %edi
page:
        movl %ebx, %eax
        xorl %edi, %eax
        movl %eax, (%edi)
        addl $4096, %edi
        cmpl $SWEEP_END, %edi
        jb page
        movl $msg_sweep, %esi
        call puts
        movl %ebx, %eax
        call puthex
        call putnl
        incl %ebx
        jmp sweep

halt:
        hlt
        jmp halt

        .data
msg_magic:   .asciz "mb-sweep: eax="
msg_flags:   .asciz "flags="
msg_lower:   .asciz "mem_lower="
msg_upper:   .asciz "mem_upper="
msg_cmdline: .asciz "cmdline="
msg_loader:  .asciz "loader="
msg_mmap:    .asciz "mmap base="
msg_len:     .asciz "length="
msg_type:    .asciz "type="
msg_port:    .asciz "port 0x2f8="
msg_mmio:    .asciz "mmio 0xfec00000="
msg_sweep:   .asciz "sweep "

        .bss
        .p2align 4
        .space 8192
stack_top:
