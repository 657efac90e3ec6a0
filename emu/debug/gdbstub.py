"""A GDB remote stub over a :class:`~emu.debug.target.DebugTarget`.

:class:`GdbStub` answers one packet at a time (GDB manual, "Remote Protocol": ``?``, ``g``/
``G``, ``p``/``P``, ``m``/``M``/``X``, ``c``/``s``/``C``/``S``, ``vCont``, ``Z0``/``z0``,
watchpoints ``Z2``-``Z4``, ``qXfer:features:read``, threads with ``qfThreadInfo``, ``Hg``, ``T``, ``qThreadExtraInfo``,
``k``/``D``, ``monitor`` commands with ``qRcmd``). A packet it does not know gets the empty
reply, which the protocol defines as "not supported"; a malformed one gets ``E01``. GDB
thread ids are emu's thread ids plus one (GDB reserves 0 for "any thread").

:func:`serve` listens on a TCP address and runs the session; while the target runs, a
watcher thread takes the client's Ctrl-C (byte 0x03) and stops it.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable

from emu.debug import monitor
from emu.debug.registers import REGISTERS, target_xml
from emu.debug.rsp import MAX_PACKET, Reader, escape, frame, unescape
from emu.debug.target import DebugTarget, Stop

_ADDRESS_LIMIT = 1 << 64
_SUPPORTED = (
    f"PacketSize={MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+;vContSupported+"
).encode()
Log = Callable[[str], None]
_WATCH_KINDS = {b"2": "watch", b"3": "rwatch", b"4": "awatch"}  # Z2 write, Z3 read, Z4 access


class GdbStub:
    """The protocol's command side: one packet in, one reply out (or None: no reply at all).

    ``send`` carries console output (``O`` packets) ahead of a stop reply.
    """

    def __init__(self, target: DebugTarget, send: Callable[[bytes], None] | None = None) -> None:
        self.target = target
        self.send = send or (lambda payload: None)
        self.no_ack = False
        self.done = False  # the client killed or detached: the session is over
        self.detached = False
        self._regs_thread: int | None = None  # Hg: whose registers g/p read (None: the current thread)
        self._last = Stop("signal", tid=target.current, reason="start")
        self._xml = target_xml().encode()

    # --- dispatch -----------------------------------------------------------------------
    def handle(self, packet: bytes) -> bytes | None:
        try:
            return self._dispatch(packet)
        except (ValueError, IndexError, OverflowError, UnicodeError):
            return b"E01"

    def _dispatch(self, p: bytes) -> bytes | None:
        if not p:
            return b""
        head = p[:1]
        if p == b"?":
            return self._stop_reply(self._last)
        if head == b"q" or head == b"Q":
            return self._query(p)
        if head == b"v":
            return self._v(p)
        if head == b"H":
            return self._set_thread(p)
        if head == b"T":
            return b"OK" if self.target.alive(_thread_id(p[1:])) else b"E01"
        if p == b"g":
            return self._read_all()
        if head == b"G":
            return self._write_all(bytes.fromhex(p[1:].decode()))
        if head == b"p":
            number = int(p[1:], 16)
            if not 0 <= number < len(REGISTERS):
                return b"E00"
            data = self.target.register(self._thread(), number)
            return b"x" * (2 * REGISTERS[number].size) if data is None else data.hex().encode()
        if head == b"P":
            which, value = p[1:].split(b"=", 1)
            ok = self.target.write_register(self._thread(), int(which, 16), bytes.fromhex(value.decode()))
            return b"OK" if ok else b"E01"
        if head == b"m":
            address, length = _address_length(p[1:])
            data = self.target.read_memory(address, min(length, MAX_PACKET // 2 - 8))
            return data.hex().encode() if data or not length else b"E01"
        if head == b"M":
            where, hexdata = p[1:].split(b":", 1)
            address, length = _address_length(where)
            data = bytes.fromhex(hexdata.decode())
            return self._write_memory(address, length, data)
        if head == b"X":
            where, raw = p[1:].split(b":", 1)
            address, length = _address_length(where)
            return self._write_memory(address, length, unescape(raw))
        if head in (b"Z", b"z"):
            return self._breakpoint(p)
        if head in (b"c", b"s"):
            return self._resume(step=head == b"s")
        if head in (b"C", b"S"):
            int(p[1:].split(b";")[0], 16)  # the signal to deliver: emu delivers none
            return self._resume(step=head == b"S")
        if p == b"k":
            self.done = True
            return None
        if head == b"D":
            self.done = self.detached = True
            return b"OK"
        return b""  # not supported (GDB manual, "Packets": an empty reply)

    # --- queries ------------------------------------------------------------------------
    def _query(self, p: bytes) -> bytes:
        name = p.split(b":", 1)[0].split(b",", 1)[0]
        if name == b"qSupported":
            return _SUPPORTED
        if p == b"QStartNoAckMode":
            self.no_ack = True
            return b"OK"
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return b"0"  # emu created the process: GDB kills it on quit
        if p == b"qC":
            return b"QC%x" % (self.target.current + 1)
        if p == b"qfThreadInfo":
            alive = [t.tid for t in self.target.threads() if not t.terminated] or [self.target.current]
            return b"m" + b",".join(b"%x" % (tid + 1) for tid in alive)
        if p == b"qsThreadInfo":
            return b"l"
        if name == b"qThreadExtraInfo":
            return self.target.describe_thread(_thread_id(p.split(b",", 1)[1])).encode().hex().encode()
        if p.startswith(b"qXfer:features:read:"):
            annex, _, span = p[len(b"qXfer:features:read:") :].rpartition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = (int(x, 16) for x in span.split(b",", 1))
            if offset < 0 or length < 0:
                return b"E00"
            chunk = self._xml[offset : offset + length]
            return (b"l" if offset + length >= len(self._xml) else b"m") + escape(chunk)
        if name == b"qRcmd":
            command = bytes.fromhex(p.split(b",", 1)[1].decode()).decode()
            return monitor.run(self.target, command).encode().hex().encode() or b"OK"
        if p == b"qSymbol::":
            return b"OK"
        return b""

    def _v(self, p: bytes) -> bytes | None:
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            actions = [a.split(b":", 1)[0][:1] for a in p[len(b"vCont;") :].split(b";")]
            if not actions or any(a not in (b"c", b"C", b"s", b"S", b"t") for a in actions):
                return b"E01"
            return self._resume(step=any(a in (b"s", b"S") for a in actions))
        if p.startswith(b"vKill"):
            self.done = True
            return b"OK"
        return b""

    # --- threads and registers ----------------------------------------------------------
    def _set_thread(self, p: bytes) -> bytes:
        op, tid = p[1:2], _thread_id(p[2:])
        if op not in (b"g", b"c"):
            return b"E01"
        if tid >= 0 and tid not in self.target.kernel.threads:
            return b"E01"
        if op == b"g":
            self._regs_thread = tid if tid >= 0 else None
        return b"OK"

    def _thread(self) -> int:
        return self.target.current if self._regs_thread is None else self._regs_thread

    def _read_all(self) -> bytes:
        tid = self._thread()
        out = bytearray()
        for i, reg in enumerate(REGISTERS):
            data = self.target.register(tid, i)
            out += data.hex().encode() if data is not None else b"x" * (2 * reg.size)
        return bytes(out)

    def _write_all(self, data: bytes) -> bytes:
        tid, at, wrote = self._thread(), 0, False
        for i, reg in enumerate(REGISTERS):
            chunk = data[at : at + reg.size]
            at += reg.size
            if len(chunk) == reg.size and chunk != self.target.register(tid, i):
                if not self.target.write_register(tid, i, chunk):
                    return b"E01"
                wrote = True
        return b"OK" if wrote or at else b"E01"

    # --- memory and breakpoints ---------------------------------------------------------
    def _write_memory(self, address: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            return b"E01"
        return b"OK" if self.target.write_memory(address, data) else b"E01"

    def _breakpoint(self, p: bytes) -> bytes:
        kind, address, size = p[1:].split(b",", 2)
        at, length = int(address, 16), int(size.split(b";")[0], 16)
        if not 0 <= at < _ADDRESS_LIMIT:
            return b"E01"
        insert = p[:1] == b"Z"
        if kind in (b"0", b"1"):  # software and hardware breakpoints: both are Unicorn exits
            ok = self.target.add_breakpoint(at) if insert else self.target.remove_breakpoint(at)
            return b"OK" if ok else b"E01"
        watch = _WATCH_KINDS.get(kind)
        if watch is None:
            return b""
        ok = (
            self.target.add_watchpoint(watch, at, length)
            if insert
            else self.target.remove_watchpoint(watch, at, length)
        )
        return b"OK" if ok else b"E01"

    # --- running ------------------------------------------------------------------------
    def _resume(self, step: bool) -> bytes:
        stop = self.target.resume(step)
        self._regs_thread = None
        for t in stop.transitions:
            self.send(b"O" + (monitor.transition_line(t) + "\n").encode().hex().encode())
        if stop.message:
            self.send(b"O" + f"emu: {stop.message}\n".encode().hex().encode())
        self._last = stop
        return self._stop_reply(stop)

    def _stop_reply(self, stop: Stop) -> bytes:
        if stop.kind == "exited":
            return b"W%02x" % (stop.code & 0xFF)
        if stop.kind == "terminated":
            return b"X%02x" % stop.signal
        why = b"swbreak:;" if stop.reason == "break" else b""
        if stop.watch is not None:
            why = b"%s:%x;" % (stop.watch[0].encode(), stop.watch[1])
        return b"T%02xthread:%x;%s" % (stop.signal, stop.tid + 1, why)


def _thread_id(text: bytes) -> int:
    """A GDB thread id as emu's: -1 for "all", -1 also for 0 ("any"), else the id minus one."""
    if text in (b"-1", b"0"):
        return -1
    return int(text.split(b".")[-1].removeprefix(b"p"), 16) - 1


def _address_length(text: bytes) -> tuple[int, int]:
    address, length = (int(x, 16) for x in text.split(b",", 1))
    if address < 0 or length < 0 or address + length > _ADDRESS_LIMIT:
        raise ValueError("address out of range")
    return address, length


def serve(target: DebugTarget, host: str, port: int, log: Log, once: bool = False) -> str:
    """Listen on ``host:port`` and serve GDB clients until one kills or detaches, or the process
    has ended and its client left. A client that just disconnects leaves the process as it
    is for the next one (unless ``once``). Returns how the session ended: "killed", "detached",
    "ended" or "disconnected"."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1)
        shown = f"[{host}]" if ":" in host else host
        log(f"waiting for gdb on {shown}:{listener.getsockname()[1]}")
        while True:
            conn, peer = listener.accept()
            log(f"gdb connected from {peer[0]}:{peer[1]}")
            with conn:
                stub = _Session(conn, target).run()
            if stub.detached:
                return "detached"
            if stub.done:
                return "killed"
            if target.ended is not None:
                return "ended"
            log("gdb disconnected; the process stays stopped for the next connection")
            if once:
                return "disconnected"


class _Session:
    """One client connection: framing, acknowledgements and Ctrl-C while the target runs."""

    def __init__(self, conn: socket.socket, target: DebugTarget) -> None:
        self.conn = conn
        self.target = target
        self.reader = Reader()
        self.stub = GdbStub(target, self._send_packet)
        self.pending = b""  # bytes the watcher read while the target ran
        self.closed = False

    def _write(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            self.closed = True

    def _send_packet(self, payload: bytes) -> None:
        self._write(frame(payload))

    def run(self) -> GdbStub:
        last = b""
        while not self.closed and not self.stub.done:
            data, self.pending = self.pending, b""
            if not data:
                try:
                    data = self.conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
            for ev in self.reader.feed(data):
                if ev.kind == "bad":
                    if not self.stub.no_ack:
                        self._write(b"-")
                elif ev.kind == "nak":
                    if last:
                        self._write(last)
                elif ev.kind == "packet":
                    if not self.stub.no_ack:
                        self._write(b"+")
                    reply = self._answer(ev.payload)
                    if reply is not None:
                        last = frame(reply)
                        self._write(last)
                    if self.stub.done:
                        break
                # acks and a Ctrl-C while stopped need no answer
        if self.stub.detached:
            self.target.finish()
        return self.stub

    def _answer(self, payload: bytes) -> bytes | None:
        if payload[:1] not in (b"c", b"s", b"C", b"S") and not payload.startswith(b"vCont;"):
            return self.stub.handle(payload)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), name="emu-gdb-watch", daemon=True)
        watcher.start()
        try:
            return self.stub.handle(payload)
        finally:
            done.set()
            watcher.join()

    def _watch(self, done: threading.Event) -> None:
        """While the target runs: a 0x03 from the client (or the client leaving) stops it."""
        stopping = False
        while not done.is_set():
            if stopping:
                self.target.interrupt()  # again: a stop that lands between two runs of the CPU is lost
            try:
                ready, _, _ = select.select([self.conn], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready or stopping:
                continue
            try:
                data = self.conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.closed = stopping = True
                continue
            if b"\x03" in data:
                stopping = True
                data = data.replace(b"\x03", b"", 1)
            self.pending += data
