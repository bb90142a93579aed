"""What the enforcer's process tracking costs a process's life: spawn + exec + exit of /bin/true.

    sudo .venv/bin/python bench/policy_exec.py [--spawns 400] [--rounds 3]

With ``--enforce`` the policy program set keeps each process's exe (busted/ebpf/policy_enforce.c:
the sched_process_exec, task_newtask and sched_process_exit tracepoints, a hash map write or
delete each). A/B in one run, alternating per round: no enforcer, then an Enforcer holding one
exe rule. Prints microseconds per spawn (median of the rounds) and the ratio; root needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def spawn(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn("/bin/true", ["true"], os.environ)
        os.waitpid(pid, 0)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--spawns", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from busted import Policy
    from busted.classify import Catalog
    from busted.policy.enforce import Enforcer

    pol = Policy.from_dict({"rules": [{"name": "c", "action": "deny", "provider": "anthropic",
                                       "exe": "/usr/bin/curl"}]})
    res: dict[str, list[float]] = {"none": [], "enforcer": []}
    for _ in range(args.rounds):
        spawn(50)  # warm
        res["none"].append(spawn(args.spawns))
        e = Enforcer(pol, Catalog.builtin())
        try:
            spawn(50)
            res["enforcer"].append(spawn(args.spawns))
        finally:
            e.close()
    out = {k: {"us_per_spawn": [round(x, 1) for x in v], "median": round(statistics.median(v), 1)}
           for k, v in res.items()}
    out["ratio"] = round(out["enforcer"]["median"] / out["none"]["median"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
