; KiUserCallbackDispatcherHandler: the exception handler KiUserCallbackDispatcher's unwind data
; registers (UNW_FLAG_EHANDLER), under the name Microsoft's public ntdll symbols give it.
; EXCEPTION_DISPOSITION Handler(ExceptionRecord, EstablisherFrame, ContextRecord, DispatcherContext)
; (MS docs "x64 exception handling", language-specific handler). emu has no user-mode exception
; dispatch yet (RtlRaiseStatus stops the run), so nothing calls it: it answers
; ExceptionContinueSearch (1) and is here so that a debugger or unwinder reading the
; dispatcher's UNWIND_INFO finds a handler where Windows has one. It sits after every stub, so
; adding it moved no other symbol.
KiUserCallbackDispatcherHandler:
    mov eax, 1
    ret
