"""``python -m emu.cli``: the same as the ``emu`` command."""

from __future__ import annotations

import sys

from emu.cli.main import main

sys.exit(main())
