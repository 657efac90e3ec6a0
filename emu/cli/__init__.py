"""The ``emu`` command: one module per subcommand group, ``main`` the entry point."""

from __future__ import annotations

from emu.cli.main import main

__all__ = ["main"]
