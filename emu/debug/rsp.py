"""The GDB remote serial protocol's framing: packets, checksums, acknowledgements, escapes.

A packet is ``$payload#cc`` with ``cc`` the payload's byte sum modulo 256 in two hex
digits; the receiver answers ``+`` (good) or ``-`` (send again) until both sides agree on
no-ack mode (``QStartNoAckMode``). A lone byte 0x03 outside a packet is an interrupt
(Ctrl-C). In binary data ``}`` escapes the next byte XOR 0x20, and ``#``, ``$``, ``}`` and
``*`` must be escaped (GDB manual, "Overview" of the remote protocol). Anything else on the
wire is noise: skipped, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_PACKET = 0x4000  # what qSupported announces as PacketSize
_LIMIT = 4 * MAX_PACKET  # a packet with no end in sight is dropped past this many bytes
_ESCAPED = frozenset(b"#$}*")


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary data for a reply: the protocol's special bytes as ``}`` and the byte XOR 0x20."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Binary data from a packet (``X``): each ``}`` and the byte after it become one byte."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """A whole packet for the wire."""
    return b"$" + payload + b"#" + f"{checksum(payload):02x}".encode()


@dataclass(frozen=True)
class Event:
    """Something read from the client: a packet, a bad packet, an ack, a nak or an interrupt."""

    kind: Literal["packet", "bad", "ack", "nak", "interrupt"]
    payload: bytes = b""


class Reader:
    """Turns the bytes a client sends, in chunks of any size, into :class:`Event` values."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        buf = self._buf
        while buf:
            b = buf[0]
            if b == 0x24:  # '$'
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    if len(buf) > _LIMIT:  # never finishes: drop it and ask again
                        del buf[:]
                        events.append(Event("bad"))
                    break
                payload, digits = bytes(buf[1:end]), bytes(buf[end + 1 : end + 3])
                del buf[: end + 3]
                try:
                    ok = int(digits, 16) == checksum(payload)
                except ValueError:
                    ok = False
                events.append(Event("packet", payload) if ok else Event("bad"))
                continue
            del buf[0]
            if b == 0x2B:  # '+'
                events.append(Event("ack"))
            elif b == 0x2D:  # '-'
                events.append(Event("nak"))
            elif b == 0x03:
                events.append(Event("interrupt"))
            # any other byte between packets is noise
        return events
