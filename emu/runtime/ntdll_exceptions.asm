; User-mode exception dispatch, after the ReactOS amd64 shapes (dll/ntdll/dispatch/amd64/dispatch.S,
; sdk/lib/rtl/amd64/except.c and unwind.c) and the layout WRK's KiDispatchException leaves
; on the stack (ke/amd64/exceptn.c). The control flow that calls guest code (handlers) is
; here; the work that only reads and writes memory (looking up .pdata, virtual unwinding,
; the vectored handler lists, one step of a frame walk) runs in the kernel model's Python
; behind the traps at the end of this file (emu/kernel/rtl.py documents each one). All state
; lives in these functions' stack frames and, for the vectored handler lists, in ntdll's .data,
; so a fork or a dump sees it as Windows would.

; KiUserExceptionDispatcher: entered by the kernel, not called, with RSP at the CONTEXT
; (16-byte aligned), the CONTEXT_EX after it, the EXCEPTION_RECORD at RSP+0x4F0 and the
; machine frame at RSP+0x590. The CONTEXT's home area (P1Home..P4Home) is the callee's
; shadow space. Handled: NtContinue(ContextRecord, FALSE); not handled: NtRaiseException(...,
; FirstChance = FALSE), the second chance; either failing raises its status.
KiUserExceptionDispatcher:
    cld
    lea rcx, [rsp + 0x4f0]
    mov rdx, rsp
    call RtlDispatchException
    test al, al
    jz KiUserExceptionDispatcher__raise
    mov rcx, rsp
    xor edx, edx
    call ZwContinue
    jmp KiUserExceptionDispatcher__status
KiUserExceptionDispatcher__raise:
    lea rcx, [rsp + 0x4f0]
    mov rdx, rsp
    xor r8d, r8d
    call ZwRaiseException
KiUserExceptionDispatcher__status:
    mov ecx, eax
    call RtlRaiseStatus
    int3

; BOOLEAN RtlDispatchException(ExceptionRecord, ContextRecord): vectored exception handlers,
; then the frame-based handlers found by walking the stack through .pdata, then the vectored
; continue handlers (ReactOS rtl/amd64/except.c, RtlDispatchException / RtlpDispatchException).
; Frame (0x618 bytes): +0x00 outgoing arguments, +0x30 the walk's block: DISPATCHER_CONTEXT
; (+0x00), the unwound CONTEXT (+0x50), ExceptionRecord (+0x520), ContextRecord (+0x528),
; NestedFrame (+0x530), state (+0x538), a record to raise (+0x540, 0x98 bytes).
RtlDispatchException:
    sub rsp, 0x618
    mov qword ptr [rsp + 0x550], rcx
    mov qword ptr [rsp + 0x558], rdx
    mov qword ptr [rsp + 0x560], 0
    mov qword ptr [rsp + 0x568], 0
    xor r8d, r8d
    call RtlpCallVectoredHandlers
    test al, al
    jnz RtlDispatchException__handled
RtlDispatchException__next:
    lea rcx, [rsp + 0x30]
    call RtlDispatchException__next_frame
    test eax, eax
    jz RtlDispatchException__unhandled
    mov rcx, qword ptr [rsp + 0x550]
    mov rdx, qword ptr [rsp + 0x48]
    mov r8, qword ptr [rsp + 0x558]
    lea r9, [rsp + 0x30]
    call RtlpExecuteHandlerForException
    lea rcx, [rsp + 0x30]
    mov edx, eax
    call RtlDispatchException__disposition
    test eax, eax
    jz RtlDispatchException__next
    cmp eax, 1
    je RtlDispatchException__handled
    lea rcx, [rsp + 0x570]
    call RtlRaiseException
    jmp RtlDispatchException__next
RtlDispatchException__handled:
    mov rcx, qword ptr [rsp + 0x550]
    mov rdx, qword ptr [rsp + 0x558]
    mov r8d, 1
    call RtlpCallVectoredHandlers
    mov al, 1
    jmp RtlDispatchException__done
RtlDispatchException__unhandled:
    mov rcx, qword ptr [rsp + 0x550]
    mov rdx, qword ptr [rsp + 0x558]
    mov r8d, 1
    call RtlpCallVectoredHandlers
    xor eax, eax
RtlDispatchException__done:
    add rsp, 0x618
    ret

; BOOLEAN RtlpCallVectoredHandlers(ExceptionRecord, ContextRecord, List): calls each handler of
; the list (0: exception handlers, 1: continue handlers) with an EXCEPTION_POINTERS, in order,
; until one answers EXCEPTION_CONTINUE_EXECUTION (-1) (ReactOS rtl/vectoreh.c).
RtlpCallVectoredHandlers:
    sub rsp, 0x48
    mov qword ptr [rsp + 0x20], rcx
    mov qword ptr [rsp + 0x28], rdx
    mov dword ptr [rsp + 0x30], r8d
    mov dword ptr [rsp + 0x34], 0
RtlpCallVectoredHandlers__next:
    mov ecx, dword ptr [rsp + 0x30]
    mov edx, dword ptr [rsp + 0x34]
    call RtlpCallVectoredHandlers__get
    test rax, rax
    jz RtlpCallVectoredHandlers__none
    inc dword ptr [rsp + 0x34]
    lea rcx, [rsp + 0x20]
    call rax
    cmp eax, -1
    jne RtlpCallVectoredHandlers__next
    mov al, 1
    jmp RtlpCallVectoredHandlers__done
RtlpCallVectoredHandlers__none:
    xor eax, eax
RtlpCallVectoredHandlers__done:
    add rsp, 0x48
    ret

; EXCEPTION_DISPOSITION RtlpExecuteHandlerForException(ExceptionRecord, EstablisherFrame,
; ContextRecord, DispatcherContext): calls DispatcherContext->LanguageHandler (+0x30) with the
; four arguments, keeping the dispatcher context at [rsp+0x20] as Windows' does.
RtlpExecuteHandlerForException:
    sub rsp, 0x28
    mov qword ptr [rsp + 0x20], r9
    call qword ptr [r9 + 0x30]
    nop
    add rsp, 0x28
    ret

; The same call for RtlUnwindEx's termination handlers.
RtlpExecuteHandlerForUnwind:
    sub rsp, 0x28
    mov qword ptr [rsp + 0x20], r9
    call qword ptr [r9 + 0x30]
    nop
    add rsp, 0x28
    ret

; VOID RtlUnwindEx(TargetFrame, TargetIp, ExceptionRecord, ReturnValue, ContextRecord,
; HistoryTable): walks the frames from its caller up to TargetFrame, calling each frame's
; termination handler (EXCEPTION_UNWINDING, EXCEPTION_TARGET_UNWIND at the target), then
; continues at TargetIp in the target frame with RAX = ReturnValue (ReactOS rtl/amd64/unwind.c
; RtlUnwindEx / RtlpUnwindInternal). Same frame layout as RtlDispatchException: the block at
; +0x30 holds DISPATCHER_CONTEXT, the unwound CONTEXT, then TargetFrame (+0x520), TargetIp
; (+0x528), ExceptionRecord (+0x530), ReturnValue (+0x538), ContextRecord (+0x540), state
; (+0x548), a local EXCEPTION_RECORD (+0x550) for a NULL ExceptionRecord.
RtlUnwindEx:
    sub rsp, 0x618
    mov qword ptr [rsp + 0x550], rcx
    mov qword ptr [rsp + 0x558], rdx
    mov qword ptr [rsp + 0x560], r8
    mov qword ptr [rsp + 0x568], r9
    mov rax, qword ptr [rsp + 0x640]
    mov qword ptr [rsp + 0x570], rax
    mov qword ptr [rsp + 0x578], 0
    xor edx, edx
RtlUnwindEx__next:
    lea rcx, [rsp + 0x30]
    call RtlUnwindEx__next_frame
    cmp eax, 1
    jne RtlUnwindEx__failed
    mov rcx, qword ptr [rsp + 0x560]
    mov rdx, qword ptr [rsp + 0x48]
    mov r8, qword ptr [rsp + 0x570]
    lea r9, [rsp + 0x30]
    call RtlpExecuteHandlerForUnwind
    mov edx, eax
    jmp RtlUnwindEx__next
RtlUnwindEx__failed:
    call RtlRaiseStatus
    int3

; VOID RtlRaiseException(ExceptionRecord): the caller's context (ExceptionAddress = its RIP),
; then RtlDispatchException in user mode (PEB.BeingDebugged is 0), then NtContinue or the
; second chance (ReactOS rtl/amd64/except.c RtlRaiseException). The CONTEXT is at +0x30.
RtlRaiseException:
    sub rsp, 0x518
    mov qword ptr [rsp + 0x500], rcx
    lea rdx, [rsp + 0x30]
    call RtlRaiseException__capture
    mov rcx, qword ptr [rsp + 0x500]
    lea rdx, [rsp + 0x30]
    call RtlDispatchException
    test al, al
    jz RtlRaiseException__raise
    lea rcx, [rsp + 0x30]
    xor edx, edx
    call ZwContinue
    jmp RtlRaiseException__status
RtlRaiseException__raise:
    mov rcx, qword ptr [rsp + 0x500]
    lea rdx, [rsp + 0x30]
    xor r8d, r8d
    call ZwRaiseException
RtlRaiseException__status:
    mov ecx, eax
    call RtlRaiseStatus
    int3

; RtlRaiseStatus(Status) continues here (the 2-byte RtlRaiseStatus before the stubs is a trap
; that jumps here): a noncontinuable exception with the status as its code, no parameters.
RtlpRaiseStatus:
    sub rsp, 0xc8
    mov dword ptr [rsp + 0x20], ecx
    mov dword ptr [rsp + 0x24], 1
    mov qword ptr [rsp + 0x28], 0
    mov qword ptr [rsp + 0x30], 0
    mov dword ptr [rsp + 0x38], 0
    lea rcx, [rsp + 0x20]
    call RtlRaiseException
    int3
RtlpRaiseStatusEnd:

; EXCEPTION_DISPOSITION __C_specific_handler(ExceptionRecord, EstablisherFrame, ContextRecord,
; DispatcherContext): the language handler of C code compiled with __try (HandlerData is a
; SCOPE_TABLE: Count, then {BeginAddress, EndAddress, HandlerAddress, JumpTarget} RVAs).
; Dispatching: each scope around ControlPc with a JumpTarget runs its filter (HandlerAddress,
; or 1 = EXCEPTION_EXECUTE_HANDLER); EXECUTE_HANDLER unwinds to JumpTarget with the exception
; code in RAX, CONTINUE_EXECUTION (-1) answers ExceptionContinueExecution. Unwinding: each
; scope without a JumpTarget runs its termination handler (TRUE, EstablisherFrame), up to the
; target scope; DispatcherContext->ScopeIndex records progress (MS docs "x64 exception
; handling"; Wine dlls/ntdll/signal_x86_64.c, ReactOS sdk/lib/crt/except/amd64). Which scope
; and what to do next is the trap __C_specific_handler__step; the calls are here.
; Frame: block at +0x30: rec, frame, ctx, dc, the next routine (+0x20), EXCEPTION_POINTERS
; (+0x28), the last filter's answer (+0x38).
__C_specific_handler:
    sub rsp, 0x78
    mov qword ptr [rsp + 0x30], rcx
    mov qword ptr [rsp + 0x38], rdx
    mov qword ptr [rsp + 0x40], r8
    mov qword ptr [rsp + 0x48], r9
    mov qword ptr [rsp + 0x58], rcx
    mov qword ptr [rsp + 0x60], r8
    mov qword ptr [rsp + 0x68], 0
__C_specific_handler__next:
    lea rcx, [rsp + 0x30]
    call __C_specific_handler__step
    cmp eax, 1
    je __C_specific_handler__filter
    cmp eax, 2
    je __C_specific_handler__termination
    cmp eax, 3
    je __C_specific_handler__unwind
    cmp eax, 4
    je __C_specific_handler__continue
    mov eax, 1                              ; ExceptionContinueSearch
    add rsp, 0x78
    ret
__C_specific_handler__continue:
    xor eax, eax                            ; ExceptionContinueExecution
    add rsp, 0x78
    ret
__C_specific_handler__filter:
    lea rcx, [rsp + 0x58]
    mov rdx, qword ptr [rsp + 0x38]
    call qword ptr [rsp + 0x50]
    movsxd rax, eax
    mov qword ptr [rsp + 0x68], rax
    jmp __C_specific_handler__next
__C_specific_handler__termination:
    mov ecx, 1
    mov rdx, qword ptr [rsp + 0x38]
    call qword ptr [rsp + 0x50]
    jmp __C_specific_handler__next
__C_specific_handler__unwind:
    mov r8, qword ptr [rsp + 0x30]          ; ExceptionRecord
    mov r9d, dword ptr [r8]                 ; ReturnValue = ExceptionCode
    mov rax, qword ptr [rsp + 0x48]
    mov rcx, qword ptr [rax + 0x28]         ; DispatcherContext->ContextRecord
    mov qword ptr [rsp + 0x20], rcx
    mov rcx, qword ptr [rax + 0x40]         ; DispatcherContext->HistoryTable
    mov qword ptr [rsp + 0x28], rcx
    mov rcx, qword ptr [rsp + 0x38]         ; TargetFrame = EstablisherFrame
    mov rdx, qword ptr [rsp + 0x50]         ; TargetIp = JumpTarget
    call RtlUnwindEx
    int3
__C_specific_handler__end:

; Traps: each is one `ret` whose work the kernel model does in Python when the CPU reaches it
; (emu/kernel/rtl.py); arguments and results follow the x64 calling convention.
RtlLookupFunctionEntry:
    ret
RtlVirtualUnwind:
    ret
RtlCaptureContext:
    ret
RtlAddVectoredExceptionHandler:
    ret
RtlRemoveVectoredExceptionHandler:
    ret
RtlAddVectoredContinueHandler:
    ret
RtlRemoveVectoredContinueHandler:
    ret
RtlpCallVectoredHandlers__get:
    ret
RtlDispatchException__next_frame:
    ret
RtlDispatchException__disposition:
    ret
RtlUnwindEx__next_frame:
    ret
RtlRaiseException__capture:
    ret
__C_specific_handler__step:
    ret
RtlpEmuTrapsEnd__:
    nop
