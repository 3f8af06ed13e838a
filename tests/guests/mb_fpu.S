# A Multiboot kernel for livemig's tests: does x87, SSE and segment state survive?
#
# It sets the whole x87/SSE state with FXRSTOR from an image of its own: three values on
# the x87 stack (TOP = 5), a non-default FPU control word and MXCSR (round toward zero),
# XMM0-XMM7. It loads FS and GS from its own GDT and then overwrites those two
# descriptors in memory: from then on only the segment registers' hidden parts hold the
# original bases. It counts in %ecx and keeps XMM0 equal to a function of the count
# (MOVDQU), prints a dot every 2^16 rounds, and polls COM1. When it receives 'c' it saves
# the state (FXSAVE, FNSTCW, FNSTSW), checks every part against its image and its count,
# prints what it found, and ends the VM through isa-debug-exit at port 0xf4: 0x20 if all
# is well (exit status 65), 0x01 if not (exit status 3).
#
# Only instructions that run under kvm_pvm: there, x87 and SSE arithmetic in 32-bit code
# ends in a KVM emulation failure (QEMU with KVM fails alike), while FXSAVE/FXRSTOR,
# MOVDQU, FNINIT, FNSTCW and FNSTSW to memory work (docs/machine.md).

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set EXIT_PORT, 0xf4
        .set FS_BASE, 0x00300000
        .set GS_BASE, 0x00400000
        .set OTHER_BASE, 0x00500000
        .set FPU_CW, 0x0f7f                 # round toward zero, 64-bit precision
        .set FPU_SW, 0x2800                 # TOP = 5: three values pushed
        .set FPU_TAG, 0xe0                  # physical registers 5, 6, 7 in use
        .set SSE_CSR, 0x7f80                # round toward zero, exceptions masked

        .text
        .code32
        .globl _start
_start:
        jmp entry
        .p2align 2
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .include "com1.inc"

# cmp_dwords: ZF set if the %ecx dwords at %esi and %edi are equal (keeps %esi/%edi/%ecx).
cmp_dwords:
        pushl %esi
        pushl %edi
        pushl %ecx
        pushl %eax
1:      movl (%esi), %eax
        cmpl (%edi), %eax
        jne 2f
        addl $4, %esi
        addl $4, %edi
        decl %ecx
        jnz 1b
2:      popl %eax
        popl %ecx
        popl %edi
        popl %esi
        ret

# lanes: the XMM0 value for count %ecx, at xmm0_exp.
lanes:
        pushl %eax
        movl %ecx, xmm0_exp
        movl %ecx, %eax
        notl %eax
        movl %eax, xmm0_exp + 4
        movl %ecx, %eax
        xorl $0x5a5a5a5a, %eax
        movl %eax, xmm0_exp + 8
        leal 0x11111111(%ecx), %eax
        movl %eax, xmm0_exp + 12
        popl %eax
        ret

entry:
        cli
        movl $stack_top, %esp
        movl $msg_start, %esi
        cmpl $0x2BADB002, %eax
        jne fail
        call puts
        movl $0x46534653, FS_BASE           # markers the bases point at
        movl $0x47534753, GS_BASE
        movl $0x4f544852, OTHER_BASE
        lgdt gdt_desc
        ljmp $0x08, $1f
1:      movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x18, %ax
        movw %ax, %fs
        movw $0x20, %ax
        movw %ax, %gs
        movw $(OTHER_BASE & 0xffff), gdt + 0x18 + 2   # the descriptors now say OTHER_BASE
        movb $((OTHER_BASE >> 16) & 0xff), gdt + 0x18 + 4
        movw $(OTHER_BASE & 0xffff), gdt + 0x20 + 2
        movb $((OTHER_BASE >> 16) & 0xff), gdt + 0x20 + 4
        movl %cr0, %eax                     # x87 and SSE on: EM off, MP and NE on
        andl $~0x4, %eax
        orl $0x22, %eax
        movl %eax, %cr0
        movl %cr4, %eax                     # OSFXSR, OSXMMEXCPT
        orl $0x600, %eax
        movl %eax, %cr4
        fninit
        fxrstor fx_image
        xorl %ecx, %ecx
        movl $msg_ready, %esi
        call puts
work:
        movl $1024, %edx
2:      incl %ecx
        call lanes
        movdqu xmm0_exp, %xmm0
        decl %edx
        jnz 2b
        testl $0xffff, %ecx
        jnz 3f
        movb $'.', %al
        call putc
3:      movw $0x3fd, %dx
        inb %dx, %al
        testb $1, %al
        jz work
        call getc
        cmpb $'c', %al
        jne work

check:
        call putnl
        fxsave fx_now
        fnstcw cw_now
        fnstsw sw_now
        movl $msg_x87, %esi
        cmpw $FPU_CW, cw_now
        jne fail
        cmpw $FPU_SW, sw_now
        jne fail
        cmpw $FPU_CW, fx_now
        jne fail
        cmpw $FPU_SW, fx_now + 2
        jne fail
        cmpb $FPU_TAG, fx_now + 4
        jne fail
        pushl %ecx
        movl $fx_image + 32, %esi           # ST0-ST2: 16-byte slots, 10 bytes used
        movl $fx_now + 32, %edi
        movl $3, %ebx
4:      movl $2, %ecx
        call cmp_dwords
        jne 5f
        movw 8(%esi), %ax
        cmpw 8(%edi), %ax
        jne 5f
        addl $16, %esi
        addl $16, %edi
        decl %ebx
        jnz 4b
5:      popl %ecx
        movl $msg_x87, %esi
        jne fail
        movl $msg_sse, %esi
        cmpl $SSE_CSR, fx_now + 24
        jne fail
        call lanes                          # XMM0 follows the count
        pushl %ecx
        movl $xmm0_exp, %esi
        movl $fx_now + 160, %edi
        movl $4, %ecx
        call cmp_dwords
        jne 6f
        movl $fx_image + 176, %esi          # XMM1-XMM7 as loaded
        movl $fx_now + 176, %edi
        movl $28, %ecx
        call cmp_dwords
6:      popl %ecx
        movl $msg_sse, %esi
        jne fail
        movl $msg_seg, %esi
        movw %fs, %ax
        cmpw $0x18, %ax
        jne fail
        movw %gs, %ax
        cmpw $0x20, %ax
        jne fail
        movl %fs:0, %eax
        cmpl $0x46534653, %eax
        jne fail
        movl %gs:0, %eax
        cmpl $0x47534753, %eax
        jne fail
        movl $msg_ok, %esi
        call puts
        movl %ecx, %eax
        call puthex
        call putnl
        movb $0x20, %al
        outb %al, $EXIT_PORT
7:      hlt
        jmp 7b

fail:                                       # %esi names what was being checked
        movl $msg_fail, %edi
        xchgl %esi, %edi
        call puts
        movl %edi, %esi
        call puts
        call putnl
        movb $0x01, %al
        outb %al, $EXIT_PORT
8:      hlt
        jmp 8b

        .data
        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff            # 0x08 code
        .quad 0x00cf92000000ffff            # 0x10 data
        .quad 0x00cf92300000ffff            # 0x18 FS: base FS_BASE, 4 GiB
        .quad 0x0040924000000fff            # 0x20 GS: base GS_BASE, 4 KiB, byte granular
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
cw_now:   .word 0
sw_now:   .word 0
        .p2align 4
xmm0_exp: .long 0, 0, 0, 0
        .p2align 4
fx_image:                                   # the FXSAVE layout
        .word FPU_CW, FPU_SW
        .byte FPU_TAG, 0
        .word 0                             # last opcode
        .long 0, 0, 0, 0                    # last instruction and operand pointers
        .long SSE_CSR, 0x0000ffff           # MXCSR, its mask
        .quad 0x8000000000000000            # ST0 = 1.0
        .word 0x3fff, 0, 0, 0
        .quad 0xc90fdaa22168c234            # ST1 = pi, rounded toward zero
        .word 0x4000, 0, 0, 0
        .quad 0xabcdef0123456789            # ST2 = about -2.9e12
        .word 0xc028, 0, 0, 0
        .space 5 * 16                       # ST3-ST7: empty
        .long 0x11111111, 0x22222222, 0x33333333, 0x44444444    # XMM0 (replaced by the count)
        .long 0x00000001, 0x00000002, 0x00000003, 0x00000004    # XMM1
        .long 0xdeadbeef, 0x02020202, 0xcafef00d, 0x0badc0de    # XMM2
        .long 0x03030303, 0x13131313, 0x23232323, 0x33333333    # XMM3
        .long 0x04040404, 0x14141414, 0x24242424, 0x34343434    # XMM4
        .long 0x05050505, 0x15151515, 0x25252525, 0x35353535    # XMM5
        .long 0x06060606, 0x16161616, 0x26262626, 0x36363636    # XMM6
        .long 0x07070707, 0x17171717, 0x27272727, 0x37373737    # XMM7
        .space 512 - 288
        .p2align 4
fx_now:   .space 512
msg_start: .asciz "fpu-check: multiboot entry\r\n"
msg_ready: .asciz "fpu-check: counting (send c to check)\r\n"
msg_x87:   .asciz "x87"
msg_sse:   .asciz "sse"
msg_seg:   .asciz "segments"
msg_ok:    .asciz "fpu-check: x87 sse segments ok after "
msg_fail:  .asciz "fpu-check: FAIL "

        .bss
        .p2align 4
        .space 16384
stack_top:
