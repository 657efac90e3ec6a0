; KiUserCallbackDispatcher, "stack" convention (Windows x64, ReactOS dll/ntdll/dispatch/amd64/dispatch.S).
; The kernel enters here with RSP at a UCALLOUT_FRAME (16-byte aligned):
;   +0x20 Buffer, +0x28 Length, +0x2C ApiNumber, +0x30 MACHINE_FRAME (Rip, SegCs, EFlags, Rsp, SegSs).
; The frame's home area (+0x00..+0x1F) is the callee's shadow space.
KiUserCallbackDispatcher:
    mov rcx, qword ptr [rsp + 0x20]
    mov edx, dword ptr [rsp + 0x28]
    mov r8d, dword ptr [rsp + 0x2c]
    mov rax, qword ptr gs:[0x60]
    mov rax, qword ptr [rax + 0x58]
    call qword ptr [rax + r8 * 8]
; The table call returns here. Microsoft's public ntdll symbols name this point
; KiUserCallbackDispatcherContinue: WinDbg stacks show a user32 callback (e.g. USER32!_fnDWORD)
; returning to "ntdll!KiUserCallbackDispatcherContinue", itself above win32u!NtUserMessageCall+0x14.
KiUserCallbackDispatcherContinue:
    xor ecx, ecx
    xor edx, edx
    mov r8d, eax
    call ZwCallbackReturn
    ; ZwCallbackReturn only returns on failure (e.g. STATUS_NO_CALLBACK_ACTIVE).
    mov ecx, eax
    call RtlRaiseStatus
    int3
