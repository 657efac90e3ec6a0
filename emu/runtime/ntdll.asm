; RtlUserThreadStart(StartAddress = RCX, Argument = RDX): every thread starts here
; (ReactOS dll/ntdll/dispatch/amd64/dispatch.S, MS docs "RtlUserThreadStart").
; Entered with RSP = 8 mod 16, like a function that was called.
RtlUserThreadStart:
    sub rsp, 0x28
    mov rax, rcx
    mov rcx, rdx
    call rax
RtlUserThreadStartReturn:
    mov edx, eax
    mov rcx, -2
    call ZwTerminateThread
    int3

; RtlRaiseStatus(Status = ECX): the model raises through a breakpoint, which the engine
; reports as a fault naming this function (no user exception dispatch yet).
RtlRaiseStatus:
    int3
    ret
