; After the system call stubs: names every ntdll exports that emu's model never enters, so
; tools that look them up in any ntdll find them (dumpulator reads them from the export
; directory when it opens a dump). emu runs no loader: LdrLoadDll returns
; STATUS_NOT_IMPLEMENTED (0xC0000002, ntstatus.h).
LdrLoadDll:
    mov eax, 0xC0000002
    ret
