"""The seen-set parallel workers share: each choice state is forked by exactly one worker.

A worker runs a path up to its next choice, then asks the seen-set whether it is the
first to reach that state; only the first forks it (the machine is deterministic, so the
others would explore the same future again). Questions go in batches, one message per
batch, so the cost per state is a share of one round trip.

The set is split into shards by the digest's leading hex digits, so on a cluster each
shard can live on its own node (a Ray actor); every digest has one owner shard, and a
batch becomes one message per shard that owns part of it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import AuthenticationError, current_process
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol


class SeenShard:
    """One shard of the set: plain data, so a manager process or a Ray actor can host it."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def claim(self, digests: Sequence[str]) -> list[bool]:
        """For each digest: True if nobody claimed it before (the caller now owns it)."""
        seen = self._seen
        out = []
        for d in digests:
            new = d not in seen
            if new:
                seen.add(d)
            out.append(new)
        return out

    def size(self) -> int:
        return len(self._seen)


def shard_of(digest: str, shards: int) -> int:
    """The shard owning a digest: its leading 32 bits, modulo the number of shards."""
    return int(digest[:8], 16) % shards if shards > 1 else 0


def sharded(shards: int, ask: Callable[[int, list[str]], list[bool]]) -> Callable[[list[str]], list[bool]]:
    """A claim function over ``shards`` shards; ``ask(shard, digests)`` sends one shard its part."""

    def claim(digests: list[str]) -> list[bool]:
        if shards == 1:
            return ask(0, digests)
        parts: dict[int, list[int]] = {}
        for i, d in enumerate(digests):
            parts.setdefault(shard_of(d, shards), []).append(i)
        out = [False] * len(digests)
        for shard, where in parts.items():
            for i, won in zip(where, ask(shard, [digests[i] for i in where]), strict=True):
                out[i] = won
        return out

    return claim


class SeenSet(Protocol):
    """What a worker is handed (picklable): it connects to the shared set and returns a claim function."""

    def connect(self) -> Callable[[list[str]], list[bool]]: ...


class SeenServer:
    """Seen-set shards served to local worker processes from threads of this process.

    One thread per connected worker; a claim is one message each way over a local socket.
    """

    def __init__(self, shards: int = 1) -> None:
        self.shards = [SeenShard() for _ in range(shards)]
        self._authkey = bytes(current_process().authkey)  # spawned workers inherit it
        self._listener = Listener(authkey=self._authkey)
        self._closing = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def handle(self) -> ServedSeenSet:
        return ServedSeenSet(self._listener.address, len(self.shards))

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):
                if self._closing:
                    return
                continue
            if self._closing:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    shard, digests = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self.shards[shard].claim(digests))

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):  # wake the accepting thread so it sees the flag
            Client(self._listener.address, authkey=self._authkey).close()
        self._accepting.join(timeout=5)
        self._listener.close()


@dataclass(frozen=True)
class ServedSeenSet:
    """The address of a :class:`SeenServer` (what a worker process is handed)."""

    address: Any
    shards: int

    def connect(self) -> Callable[[list[str]], list[bool]]:
        conn = Client(self.address, authkey=bytes(current_process().authkey))

        def ask(shard: int, digests: list[str]) -> list[bool]:
            conn.send((shard, digests))
            won: list[bool] = conn.recv()
            return won

        return sharded(self.shards, ask)


@dataclass(frozen=True)
class RaySeenSet:
    """Ray actor handles of :class:`SeenShard` (what a Ray task is handed)."""

    actors: tuple[Any, ...]

    def connect(self) -> Callable[[list[str]], list[bool]]:
        import ray

        actors = self.actors

        def ask_all(digests: list[str]) -> list[bool]:
            # One message per shard owning part of the batch, all in flight at once.
            parts: dict[int, list[int]] = {}
            for i, d in enumerate(digests):
                parts.setdefault(shard_of(d, len(actors)), []).append(i)
            refs = {s: actors[s].claim.remote([digests[i] for i in where]) for s, where in parts.items()}
            out = [False] * len(digests)
            for s, where in parts.items():
                for i, won in zip(where, ray.get(refs[s]), strict=True):
                    out[i] = won
            return out

        return ask_all
