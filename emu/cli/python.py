"""The command line's Python options: ``--allow-python`` and ``--services package.module:name``.

A scenario is data; Python code runs only when the user says so on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses

from emu.errors import ExtensionError
from emu.scenario import Scenario

ALLOW_PYTHON_HELP = "let the run import Python: the scenario's [python] table and --services"
SERVICES_HELP = "Python system services to add: a ServiceRegistry as package.module:name (needs --allow-python)"


def add_python_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-python", action="store_true", help=ALLOW_PYTHON_HELP)
    parser.add_argument("--services", action="append", default=[], metavar="MODULE:NAME", help=SERVICES_HELP)


def with_python(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """The scenario with the command line's services and permission to load Python."""
    refs: list[str] = list(getattr(args, "services", []) or [])
    allow = bool(getattr(args, "allow_python", False))
    if refs and not allow:
        raise ExtensionError("service", f"--services {refs[0]} loads Python code: pass --allow-python too")
    if not refs and not allow:
        return scenario
    return dataclasses.replace(scenario, python_services=(*scenario.python_services, *refs), allow_python=allow)
