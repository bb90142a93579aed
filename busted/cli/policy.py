"""``busted policy check FILE`` and the live commands' policy options (--policy, --enforce, reload)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, TextIO

from busted.errors import PolicyError
from busted.policy.rules import Policy

__all__ = ["Reloader", "add_policy_options", "add_policy_parser", "policy_command", "policy_kwargs"]


def add_policy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy files: check one")
    psub = p.add_subparsers(dest="policy_cmd", required=True)
    c = psub.add_parser("check", help="validate a policy file and print its rules as understood")
    c.add_argument("file")


def policy_command(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 0 and the rules as understood, or raise PolicyError (file:line: why) -> exit 2. The
    checks are the monitor's at load (dry run and --enforce alike): the file's trust, the rule
    limits and the provider ids (against the built-in catalog)."""
    from busted.classify import Catalog

    pol = Policy.load(args.file)
    pol.check_providers(Catalog.builtin().providers)
    print(pol.describe(), file=out)
    from busted.policy.model_enforce import check_notes

    for note in check_notes(pol):  # what --enforce does with model rules (in the kernel or not)
        print(f"  note: {note}", file=out)
    return 0


def add_policy_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--policy", metavar="FILE", help="policy file (TOML): report allow/audit/deny decisions; "
                    "blocks nothing without --enforce. SIGHUP reloads it")
    sp.add_argument("--enforce", action="store_true", help="with --policy: stop denied flows in the kernel")
    sp.add_argument("--policy-scope", metavar="CGROUP", help="enforce only under this cgroup v2 path "
                    "(default: the whole host)")


def policy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Monitor keywords for --policy/--enforce/--policy-scope (PolicyError for a bad file)."""
    path = getattr(args, "policy", None)
    if not path:
        if getattr(args, "enforce", False):
            raise PolicyError("--enforce needs --policy FILE")
        return {}
    return {"policy": Policy.load(path), "enforce": bool(getattr(args, "enforce", False)),
            "policy_scope": getattr(args, "policy_scope", None)}


class Reloader:
    """SIGHUP reloads the policy file. The handler only sets a flag; a small thread does the reload
    (a signal handler must not take the Monitor's locks). An invalid file keeps the old policy."""

    def __init__(self, mon: Any, path: str | None, err: TextIO | None = None, install: bool = True) -> None:
        self.mon, self.path, self.err = mon, path, err or sys.stderr
        self._hup = threading.Event()
        self.reloads = 0
        if install and path and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda _s, _f: self._hup.set())
            threading.Thread(target=self._run, name="busted-policy-reload", daemon=True).start()

    def _run(self) -> None:
        while not self.mon.closed:
            if self._hup.wait(0.5):
                self._hup.clear()
                self.reload()

    def reload(self) -> bool:
        try:
            self.mon.set_policy(self.path)
        except PolicyError as exc:
            print(f"busted: policy not reloaded, the previous one stays in force: {exc}", file=self.err, flush=True)
            return False
        self.reloads += 1
        print(f"busted: policy reloaded from {self.path} ({len(self.mon.policy.rules)} rules)",
              file=self.err, flush=True)
        return True
