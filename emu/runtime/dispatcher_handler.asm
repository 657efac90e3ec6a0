; KiUserCallbackDispatcherHandler(ExceptionRecord, EstablisherFrame, ContextRecord, DispatcherContext):
; the exception and unwind handler KiUserCallbackDispatcher's unwind data registers
; (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER), under the name Microsoft's public ntdll symbols give it.
; It runs when an exception leaves a callback without being handled there.
;
; What Windows does then depends on the build (the profile's callback_exception, a byte in
; .data): Windows 7 SP1 "swallows" the exception (MS KB976038, "Exceptions that are thrown from
; an application that runs in a 64-bit version of Windows are ignored": the callback returns to
; the kernel and the program goes on); Windows 10 and 11 end the process with
; STATUS_FATAL_USER_CALLBACK_EXCEPTION (0xC000041D, ntstatus.h: "An unhandled exception was
; encountered during a user callback").
;   swallow: unwind to KiUserCallbackDispatcherContinue with the exception code as the callback's
;            status (RtlUnwindEx), so the dispatcher's own ZwCallbackReturn returns it to the kernel;
;            while unwinding through the dispatcher (a handler further out took the exception),
;            return to the kernel at once: ZwCallbackReturn(NULL, 0, ExceptionCode).
;   fatal:   NtTerminateProcess(NtCurrentProcess(), STATUS_FATAL_USER_CALLBACK_EXCEPTION).
KiUserCallbackDispatcherHandler:
    sub rsp, 0x38
    test dword ptr [rcx + 4], 0x66          ; EXCEPTION_UNWIND (unwinding, exit unwind, target, collided)
    jnz KiUserCallbackDispatcherHandler__unwinding
    cmp byte ptr [rip + RtlpCallbackExceptionPolicy], 0
    jne KiUserCallbackDispatcherHandler__swallow
    mov rcx, -1
    mov edx, 0xC000041D
    call ZwTerminateProcess
    int3
KiUserCallbackDispatcherHandler__swallow:
    mov r9d, dword ptr [rcx]                ; ReturnValue = ExceptionCode
    mov qword ptr [rsp + 0x20], r8          ; ContextRecord
    mov qword ptr [rsp + 0x28], 0           ; HistoryTable
    mov r8, rcx                             ; ExceptionRecord
    mov rcx, rdx                            ; TargetFrame = the dispatcher's frame
    lea rdx, [rip + KiUserCallbackDispatcherContinue]
    call RtlUnwindEx
    int3
KiUserCallbackDispatcherHandler__unwinding:
    test dword ptr [rcx + 4], 0x20          ; EXCEPTION_TARGET_UNWIND: the dispatcher is the target
    jnz KiUserCallbackDispatcherHandler__search
    mov r8d, dword ptr [rcx]
    xor ecx, ecx
    xor edx, edx
    call ZwCallbackReturn
    mov ecx, eax
    call RtlRaiseStatus
KiUserCallbackDispatcherHandler__search:
    mov eax, 1                              ; ExceptionContinueSearch
    add rsp, 0x38
    ret
