"""The explorer's memory tricks keep exploration exact: host-backed large regions, hot pages,
dropped trace records; and the seen-set parallel workers share gives each state one owner."""

from __future__ import annotations

import itertools
import threading

from emu.exploration.claims import SeenServer, SeenShard, shard_of, sharded
from emu.exploration.explorer import Explorer, explore
from emu.scenario import parse_scenario
from emu.snapshot import HOST_BACKED

# K two-way choices; after choice i with answer b (NtYieldExecution's status, 0 or 1) the
# program stores 1 into page 2*i + b of a region. At the end it folds the first qword of
# every page p into RAX as bit p: each path must see exactly its own K pages written, none
# of a sibling path's (restored memory) and none missing (a hot page's bytes kept).
FOLD = """
[scenario]
name = "pages_{size:x}"
[budgets]
wall_time = 120
[[memory]]
name = "big"
start = 0x10000000
size = {size:#x}
perms = "rw"
[[module]]
name = "app"
code = '''
main:
    push rbx
    push rsi
    push rdi
    sub rsp, 0x20
    xor ebx, ebx
again:
    call NtYieldExecution
    lea rsi, [rbx * 2 + rax]
    shl rsi, 12
    mov rcx, 0x10000000
    mov qword ptr [rcx + rsi], 1
    inc ebx
    cmp ebx, {k}
    jb again
    xor eax, eax
    xor ebx, ebx
    mov rdi, 0x10000000
fold:
    mov rdx, qword ptr [rdi]
    mov ecx, ebx
    shl rdx, cl
    or rax, rdx
    add rdi, 0x1000
    inc ebx
    cmp ebx, {pages}
    jb fold
    add rsp, 0x20
    pop rdi
    pop rsi
    pop rbx
    ret
'''
[thread]
entry = "app!main"
[services.NtYieldExecution]
steps = [{{ kind = "choice", name = "bit", options = {{ zero = [{{ kind = "return", status = 0 }}], one = [{{ kind = "return", status = 1 }}] }} }}]
"""
K = 4


def _folds(size: int, strategy: str = "dfs") -> set[int]:
    exp = explore(parse_scenario(FOLD.format(size=size, k=K, pages=2 * K), "fold.toml"), strategy)  # type: ignore[arg-type]
    assert exp.complete
    # The exit status is main's return value (RtlUserThreadStart passes it on); paths end in
    # one "exited" state, so the statuses are on the edges into it.
    return {a["edge"].status for _, _, a in exp.graph.lean.edges(data=True) if a["edge"].kind == "exit"}


def _expected() -> set[int]:
    return {sum(1 << (2 * i + b) for i, b in enumerate(bits)) for bits in itertools.product((0, 1), repeat=K)}


def test_each_path_sees_only_its_own_writes_in_a_host_backed_region() -> None:
    assert HOST_BACKED <= 4 << 20  # the region below is moved onto host memory
    assert _folds(4 << 20) == _expected()
    assert _folds(4 << 20, "bfs") == _expected()


def test_a_small_region_gives_the_same_answers() -> None:
    assert HOST_BACKED > 64 << 10
    assert _folds(64 << 10) == _expected()


def test_pages_written_after_every_fork_turn_hot_and_stay_exact() -> None:
    sc = parse_scenario(FOLD.format(size=4 << 20, k=K, pages=2 * K), "fold.toml")
    explorer = Explorer(sc, "dfs")
    explorer.run()
    assert explorer.cow.hot  # the stack top at least: written after every restore
    assert explorer.cow.faults < 2 ** (K + 1)  # fewer write faults than forked segments


def test_trace_records_are_dropped_once_nothing_names_them() -> None:
    sc = parse_scenario(FOLD.format(size=64 << 10, k=K, pages=2 * K), "fold.toml")
    explorer = Explorer(sc, "bfs")
    exp = explorer.run()
    kept = [r for r in explorer.trace.raw_states if r]
    assert len(explorer.trace.raw_states) >= exp.states  # every state was recorded ...
    assert len(kept) <= len(explorer.kernel.threads)  # ... and only the live threads' records remain
    assert not explorer.trace.raw_transitions


def test_a_seen_shard_gives_each_digest_to_its_first_claimant() -> None:
    shard = SeenShard()
    assert shard.claim(["a", "b", "a"]) == [True, True, False]
    assert shard.claim(["b", "c"]) == [False, True]


def test_sharding_sends_each_digest_to_one_shard() -> None:
    shards = [SeenShard() for _ in range(3)]
    asked: list[int] = []

    def ask(i: int, digests: list[str]) -> list[bool]:
        asked.append(i)
        assert all(shard_of(d, 3) == i for d in digests)
        return shards[i].claim(digests)

    claim = sharded(3, ask)
    digests = [f"{n:08x}" + "0" * 16 for n in range(12)]
    assert claim(digests) == [True] * 12
    assert claim(list(reversed(digests))) == [False] * 12
    assert sorted(set(asked)) == [0, 1, 2]


def test_workers_racing_on_the_served_seen_set_win_each_digest_once() -> None:
    server = SeenServer()
    try:
        digests = [f"{n:024x}" for n in range(500)]
        won: list[list[bool]] = [[], []]

        def worker(i: int) -> None:
            claim = server.handle.connect()  # what a worker process does, over a real socket
            for start in range(0, len(digests), 50):
                won[i].extend(claim(digests[start : start + 50]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.close()
    assert [a + b for a, b in zip(won[0], won[1], strict=True)] == [1] * len(digests)
