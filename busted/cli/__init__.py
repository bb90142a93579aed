"""The ``busted`` command. ``main(argv)`` takes its arguments so tests can call it directly.

    busted doctor            what this kernel offers and which probe tiers busted would use
    busted monitor           live flows (table on a terminal, --json for NDJSON)
    busted top               refreshing per-process x provider table
    busted lab               a network lab with demo LLM traffic, monitored (no internet needed)
    busted query             read a store written with --store
    busted policy            check a policy file (busted.cli.policy)
    busted ui                the web page over a store

One module per command (doctor, monitor, top, lab, query, policy, ui); ``parser`` defines every
flag once, ``outputs`` opens what the flags ask for, ``render`` is what they print.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from busted._text import printable as _p
from busted.cli.doctor import _doctor
from busted.cli.lab import LabCalls, _lab
from busted.cli.monitor import _monitor, _run_monitor
from busted.cli.outputs import _monitor_kwargs, _Sinks
from busted.cli.parser import _Parser, _parser
from busted.cli.query import _query
from busted.cli.render import HEADER, _install_sigterm, _wants, ready_line, render
from busted.cli.top import TopTable, _top
from busted.cli.ui import _ui
from busted.errors import BustedError

__all__ = ["HEADER", "LabCalls", "TopTable", "main", "ready_line", "render"]
# what tests and bench/ reach for by name (the package's parts, as the single module had them)
_for_tests = (_Parser, _Sinks, _install_sigterm, _monitor_kwargs, _run_monitor, _wants)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    from busted.cli.policy import policy_command

    handlers = {"doctor": _doctor, "monitor": _monitor, "top": _top, "lab": _lab, "query": _query,
                "policy": policy_command, "ui": _ui}
    try:
        return handlers[args.cmd](args, out)
    except BustedError as exc:
        # Messages carry paths and BCC's output: escaped per line, newlines kept.
        print("\n".join(_p(line) for line in f"busted: {exc}".split("\n")), file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
