```asm
section .text
global _start

_start:
    mov rcx, 10
.loop:
    push rcx
    mov rax, 1
    mov rdi, 1
    mov rsi, msg
    mov rdx, len
    syscall
    pop rcx
    dec rcx
    jnz .loop

    nop
    nop
    nop
    nop

    mov rax, 60
    xor rdi, rdi
    syscall

section .data
msg db "hi", 10
len equ $ - msg
```
