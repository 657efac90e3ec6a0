"""The ``emu`` command's exit codes: one home for every subcommand.

0 every expectation holds (``score``: the detector matches the ground truth); 1 an
expectation failed, or the detector missed (each named); 2 invalid input: a scenario,
an argument, a file that cannot be read or written, input nested too deeply; 3 the run
or exploration stopped on a budget or a fault (named), or the process ran out of memory;
130 interrupted by Ctrl-C (128 + SIGINT, the shell's convention).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_EXPECT = 1
EXIT_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
