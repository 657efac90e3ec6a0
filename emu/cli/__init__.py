"""The ``emu`` command: one module per subcommand group, ``main`` the entry point.

``emu.cli.main`` is the module, and calling it runs the command (:mod:`emu.callable_module`),
so the ``emu.cli:main`` entry point and ``import emu.cli.main`` both work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.callable_module import make_callable

if TYPE_CHECKING:
    from emu.cli.main import main
else:
    from emu.cli import main

    make_callable(main.__name__)

__all__ = ["main"]
