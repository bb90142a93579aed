"""Option prefixes are refused, not taken for another option (issue 17 item 4): argparse's default
``allow_abbrev=True`` made ``busted monitor --ui ADDR`` mean ``--uid ADDR``."""

import argparse
import ast
from pathlib import Path

import pytest

from busted import cli

ROOT = Path(__file__).resolve().parents[2]


def test_a_prefix_of_an_option_is_an_unknown_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["monitor", "--provid", "openai"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unrecognized arguments: --provid" in err
    a = cli._parser().parse_args(["monitor", "--ui", "127.0.0.1:8765"])  # --ui is its own option now
    assert a.ui == "127.0.0.1:8765" and a.uid is None
    for argv in (["monitor", "--dur", "1"], ["top", "--inter", "1"], ["query", "--sto", "x.db"],
                 ["doctor", "--eb"], ["policy", "check", "--enf", "x"]):
        with pytest.raises(SystemExit):
            cli._parser().parse_args(argv)
    assert cli._parser().parse_args(["monitor", "--uid", "7", "--duration", "1"]).uid == [7]  # whole names work


def _parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _parsers(sp)


def test_every_busted_subcommand_refuses_prefixes():
    names = [sp.prog for sp in _parsers(cli._parser())]
    assert {"busted monitor", "busted policy check", "busted query", "busted doctor"} <= set(names)
    assert [sp.prog for sp in _parsers(cli._parser()) if sp.allow_abbrev] == []


@pytest.mark.parametrize("folder", ["busted", "bench"])
def test_every_argument_parser_in_the_tree_turns_abbreviations_off(folder):
    """Parsers outside busted/cli/ (lab, its servers, bench scripts) say allow_abbrev=False themselves."""
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name not in ("ArgumentParser", "add_parser"):
                continue
            if f.parent.name == "cli" and f.parent.parent.name == "busted":
                continue  # cli._Parser (checked above, with the policy subcommands it builds)
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert bad == []
