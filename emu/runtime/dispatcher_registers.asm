; KiUserCallbackDispatcher, "registers" convention (Wine <= 8's PE ntdll, dlls/ntdll/signal_x86_64.c;
; Wine 9 and later use the Windows "stack" layout):
; entered like a call, ECX = ApiNumber, RDX = InputBuffer, R8D = InputLength, RSP = 8 mod 16.
KiUserCallbackDispatcher:
    sub rsp, 0x28
    mov r9d, ecx
    mov rcx, rdx
    mov edx, r8d
    mov rax, qword ptr gs:[0x60]
    mov rax, qword ptr [rax + 0x58]
    call qword ptr [rax + r9 * 8]
; The table call returns here. Microsoft's public ntdll symbols name this point
; KiUserCallbackDispatcherContinue: WinDbg stacks show a user32 callback (e.g. USER32!_fnDWORD)
; returning to "ntdll!KiUserCallbackDispatcherContinue", itself above win32u!NtUserMessageCall+0x14.
KiUserCallbackDispatcherContinue:
    xor ecx, ecx
    xor edx, edx
    mov r8d, eax
    call ZwCallbackReturn
    mov ecx, eax
    call RtlRaiseStatus
    int3
