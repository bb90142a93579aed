"""``busted policy check FILE`` and the monitor's policy options, kept out of cli.py's way."""

from __future__ import annotations

import argparse
from typing import TextIO

from busted.policy import Policy

__all__ = ["add_policy_parser", "policy_command"]


def add_policy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy files: check one")
    psub = p.add_subparsers(dest="policy_cmd", required=True)
    c = psub.add_parser("check", help="validate a policy file and print its rules as understood")
    c.add_argument("file")


def policy_command(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 0 and the rules as understood, or raise PolicyError (file:line: why) -> exit 2."""
    pol = Policy.load(args.file)
    print(pol.describe(), file=out)
    return 0
