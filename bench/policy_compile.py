"""Time to compile a policy for the kernel (``busted.policy.enforce.compile_policy``) by hostname count.

    .venv/bin/python bench/policy_compile.py [--sizes 2000,4000,8000] [--repeat 5]

The policy: 62 deny rules (the kernel's limit) sharing N hostnames, half exact (``apiN.svcK.x.com``),
half subtrees (``*.svcN.x.com``), against the builtin catalog. This runs at start-up and at every
reload (SIGHUP), under the Monitor's drain lock. Prints the median and spread of ``--repeat`` runs
per size, and the ratio to the smallest size (linear: ~ the ratio of the sizes). No root needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def policy(n: int):
    from busted.policy.rules import Policy

    rules = [{"name": f"r{i}", "action": "deny", "hostname": []} for i in range(62)]
    for j in range(n):
        h = f"api{j}.svc{j % 97}.x.com" if j % 2 == 0 else f"*.svc{j}.x.com"
        rules[j % 62]["hostname"].append(h)
    return Policy.from_dict({"default": "audit", "rules": rules})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--sizes", default="2000,4000,8000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    from busted.classify import Catalog
    from busted.policy.enforce import compile_policy

    cat = Catalog.builtin()
    out = []
    for n in (int(x) for x in args.sizes.split(",")):
        pol = policy(n)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            c = compile_policy(pol, cat, cgroup_mount="/nonexistent")
            ts.append(time.perf_counter() - t0)
        out.append({"hostnames": n, "kernel_names": len(c.names), "median_s": round(statistics.median(ts), 4),
                    "min_s": round(min(ts), 4), "max_s": round(max(ts), 4)})
    for r in out:
        r["ratio_to_first"] = round(r["median_s"] / out[0]["median_s"], 2)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
