"""Fuzzing the emu command itself: argument vectors and output paths (fast profile by default).

Whatever the arguments, ``emu`` answers with a documented exit code and at most a usage
message or one line per problem on stderr: never a traceback, never an exception out of
``main``. Output paths include folders that cannot be written, directories, odd suffixes and
existing files.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from fuzz_support import FAST, no_hang, slow_only, slow_settings
from hypothesis import given
from hypothesis import strategies as st

from emu.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["run", "detect", "graph", "explore", "explain", "plot", "dump", "score", "image", "bogus", ""]
SCENARIOS = ["scenarios/callback_roundtrip.toml", "scenarios/choice_status.toml", "scenarios/no_callback_active.toml"]


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    out_dir = "{tmp}"
    paths = st.sampled_from(
        [
            *(str(ROOT / s) for s in SCENARIOS),
            str(ROOT / "scenarios"),
            "{tmp}/missing.toml",
            "{tmp}",
            "/proc/emu-out.json",
            f"{out_dir}/o.json",
            f"{out_dir}/o.dot",
            f"{out_dir}/o.graphml",
            f"{out_dir}/o.png",
            f"{out_dir}/o.svg",
            f"{out_dir}/o.dmp",
            f"{out_dir}/o",
            f"{out_dir}/sub/dir/o.json",
            f"{out_dir}/existing.json",
            "",
            "-",
        ]
    )
    words = st.one_of(
        paths,
        st.sampled_from(["--json", "--force", "--graph", "--no-progress", "--explore", "-h", "--version"]),
        st.tuples(st.sampled_from(["-o", "--output"]), paths).map(list),
        st.tuples(st.just("--state"), st.sampled_from(["s3", "n3", "3", "pending", "x", "-1", "n99", "a", ""])).map(
            list
        ),
        st.tuples(st.just("--workers"), st.sampled_from(["0", "-1", "1", "2x", ""])).map(list),
        st.tuples(st.just("--strategy"), st.sampled_from(["bfs", "dfs", "xyz"])).map(list),
        st.tuples(st.just("--base"), st.sampled_from(["zzz", "0x180000000", "-5", "1e3"])).map(list),
        st.tuples(st.just("--allow-path"), paths).map(list),
        st.tuples(st.just("--dump"), paths).map(list),
        st.tuples(
            st.just("--detector"), st.sampled_from(["emu.detection.signals:naive_detector", "nope:x", "x", ":"])
        ).map(list),
        st.text(alphabet="abcs0123-_./:n", max_size=8),
    )
    rest = draw(st.lists(words, max_size=5))
    flat: list[str] = [draw(st.sampled_from(COMMANDS))]
    for w in rest:
        flat.extend(w if isinstance(w, list) else [w])
    return flat


def _check(args: list[str], tmp: Path) -> None:
    tmp.mkdir(exist_ok=True)
    (tmp / "existing.json").write_text("{}")
    real = [a.replace("{tmp}", str(tmp)) for a in args]
    if "explore" in real[:1] and "--workers" in real:  # worker processes are too slow for a fuzz case
        return
    out, err = io.StringIO(), io.StringIO()
    with no_hang(case=" ".join(real)), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | str | None = main(real)
        except SystemExit as e:  # argparse: usage errors (2), --help and --version (0)
            code = e.code
    text = err.getvalue()
    assert code in (0, 1, 2, 3), (real, code, text)
    assert "Traceback" not in text, (real, text)
    if not text.startswith("usage:"):
        assert len(text.strip().splitlines()) <= 4, (real, text)  # one line per problem (notes, failed expectations)


@FAST
@given(argv())
def test_the_cli_never_lets_an_error_escape(tmp_path_factory: pytest.TempPathFactory, args: list[str]) -> None:
    _check(args, tmp_path_factory.mktemp("cli"))


@slow_only
@slow_settings(5_000)
@given(argv())
def test_the_cli_never_lets_an_error_escape_slow(tmp_path_factory: pytest.TempPathFactory, args: list[str]) -> None:
    _check(args, tmp_path_factory.mktemp("cli"))
