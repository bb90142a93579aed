"""What the kernel's verifier spends on each enforcement program (issue 21, "--enforce start").

    sudo .venv/bin/python bench/verifier_cost.py [--rounds 5] [--rev main] [--only pol_connect6,...]

Compiles policy_enforce.c + policy_model.c as ``busted.policy.enforce.build_source`` does (through
the bytecode cache), creates the maps, then loads every program the Enforcer verifies, one at a
time (no other load running beside it), asking the verifier for its statistics (log level 4):
instructions processed, peak states, the kernel's own "verification time", and the wall time of
BPF_PROG_LOAD. ``--rev REV`` also measures the two C files as they are at git revision REV (the
rest of the source from this tree), alternating with this tree's round by round, so the same
host's drift hits both. Medians of the rounds; instruction counts do not vary between rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_STATS = re.compile(r"processed (\d+) insns .*?total_states (\d+) peak_states (\d+)")
_VTIME = re.compile(r"verification time (\d+) usec")


def sources(rev: str | None) -> str:
    from busted.policy import enforce

    if rev is None:
        return enforce.build_source()
    from busted.policy.budgets import c_definitions as budget_definitions

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    return (enforce.c_definitions() + budget_definitions() + show("busted/ebpf/policy_enforce.c")
            + show("busted/ebpf/policy_model.c"))


def programs() -> list[tuple[str, int, int]]:
    from busted.policy import enforce
    from busted.policy.model_enforce import ModelGuard

    return ([(f"tracepoint__{c}__{n}", enforce._PROG_TRACEPOINT, 0) for c, n in enforce._TRACEPOINTS]
            + [(fn, pt, at) for _t, _s, fn, pt, at in enforce._TAILS]
            + [(fn, pt, at) for fn, (pt, at) in enforce._ATTACH.items()]
            + ModelGuard.programs())


def one_round(source: str, progs: list[tuple[str, int, int]]) -> dict[str, dict]:
    from busted.ebpf import bpfsys, bytecode

    comp = bytecode.get_compiled(source)
    loaded = bytecode.create_maps(comp)
    out: dict[str, dict] = {}
    try:
        fd_map = {m.child_fd: loaded.maps[m.name].fd for m in comp.maps}
        for fn, ptype, atype in progs:
            insns = bytecode.relocate(comp.funcs[fn], fd_map)
            t0 = time.perf_counter()
            fd, log = bpfsys.load_prog_stats(ptype, insns, name=fn, license=comp.license,
                                             kern_version=comp.kern_version, expected_attach_type=atype)
            wall = time.perf_counter() - t0
            os.close(fd)
            st = _STATS.search(log)
            vt = _VTIME.search(log)
            out[fn] = {"size": len(insns) // 8, "processed": int(st.group(1)) if st else -1,
                       "peak_states": int(st.group(3)) if st else -1,
                       "verify_ms": int(vt.group(1)) / 1000 if vt else -1.0, "load_ms": wall * 1000}
    finally:
        loaded.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rev", default=None, help="also measure the C files at this git revision")
    ap.add_argument("--only", default="", help="comma-separated program names")
    a = ap.parse_args()
    progs = programs()
    if a.only:
        keep = set(a.only.split(","))
        progs = [p for p in progs if p[0] in keep]
    srcs = {"this tree": sources(None)}
    if a.rev:
        srcs[a.rev] = sources(a.rev)
    res: dict[str, list[dict[str, dict]]] = {k: [] for k in srcs}
    for _ in range(a.rounds):  # versions alternate round by round
        for k, src in srcs.items():
            res[k].append(one_round(src, progs))
    summary: dict[str, dict] = {}
    for k, rounds in res.items():
        rows = {}
        for fn, _pt, _at in progs:
            rs = [r[fn] for r in rounds]
            rows[fn] = {"size": rs[0]["size"], "processed": rs[0]["processed"], "peak_states": rs[0]["peak_states"],
                        "verify_ms": round(statistics.median(r["verify_ms"] for r in rs), 1),
                        "load_ms": round(statistics.median(r["load_ms"] for r in rs), 1)}
        rows["(sum)"] = {"processed": sum(r["processed"] for r in rows.values()),
                         "load_ms": round(sum(r["load_ms"] for r in rows.values()), 1)}
        summary[k] = rows
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
