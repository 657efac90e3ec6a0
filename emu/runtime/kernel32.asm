; kernel32!BaseThreadInitThunk(Unused = ECX, StartAddress = RDX, Parameter = R8): what
; ntdll!RtlUserThreadStart calls on Windows and in Wine (MS docs "RtlUserThreadStart";
; Wine dlls/kernel32/thread.c BaseThreadInitThunk). It calls the thread's entry with the
; parameter and ends the thread with the entry's return value. Windows goes on through
; ExitThread -> RtlExitUserThread, which runs the loader's thread-detach work (DllMain
; notifications, LdrShutdownThread); emu runs no loader, so this thunk ends the thread
; with NtTerminateThread(NtCurrentThread(), status) directly.
BaseThreadInitThunk:
    sub rsp, 0x28
    mov rax, rdx
    mov rcx, r8
    call rax
BaseThreadInitThunk__return:
    mov edx, eax
    mov rcx, -2
    call qword ptr [rip + __imp_NtTerminateThread]
    int3
    .align 8
__imp_NtTerminateThread:
    .quad NtTerminateThread
