"""Start time and memory of ``Monitor(policy=..., enforce=True)`` (issue 21, "One BPF stack").

    sudo .venv/bin/python bench/enforce_start.py [--runs 5] [--configs default,enforce] [--base DIR]

Each run is a fresh process that builds the Monitor, starts it (timed: ``Monitor()`` ->
``start()`` returned), keeps it 2 s, then closes it. Reported per config, medians over the runs:
start seconds, VmRSS after the 2 s, peak RSS (os.wait4's ru_maxrss, what ``/usr/bin/time -v``
prints), and whether BCC or LLVM was in the process. One warm-up run per config goes first and
is not counted, so the bytecode cache is warm (``enforce``: the flow program and, since issue 21,
the enforcement programs). The policy denies a provider and a model and is enforced under a cgroup
made for the run (no process in it): nothing on the host is refused.

``--base DIR``: each config also runs with the ``busted`` package of DIR (a checkout or ``git
archive`` of another revision), as ``CONFIG@base``, in the same alternation: before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

CHILD = r"""
import json, os, sys, time
import busted
cfg, scope = sys.argv[1], sys.argv[2]
kw = {}
if cfg == "enforce":
    kw = dict(policy=busted.Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-deepseek", "action": "deny", "provider": "deepseek"},
        {"name": "no-big-model", "action": "deny", "model": "gpt-4o"}]}),
        enforce=True, policy_scope=scope)
t0 = time.monotonic()
m = busted.Monitor(**kw).start()
start_s = time.monotonic() - t0
time.sleep(2)
maps = open("/proc/self/maps").read()
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
out = {"start_s": start_s, "rss_mb": rss, "bcc": "bcc" in sys.modules, "busted": busted.__file__,
       "llvm": "libLLVM" in maps or "libclang" in maps or "libbcc" in maps}
m.close()
print(json.dumps(out), flush=True)
"""


def one(cfg: str, scope: str, root: Path = ROOT) -> dict:
    """One run; the child imports ``busted`` from ``root`` (its working directory, first on sys.path)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([PY, "-c", CHILD, cfg, scope], stdout=out, stderr=subprocess.PIPE, text=True,
                             cwd=root, env=env)
        _pid, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read() if p.stderr else ""
        if p.returncode != 0:
            raise RuntimeError(f"{cfg}: exit {p.returncode}: {err[-2000:]}")
        out.seek(0)
        r = json.loads(out.read().strip().splitlines()[-1])
    r["maxrss_mb"] = ru.ru_maxrss / 1024
    return r


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--configs", default="default,enforce")
    ap.add_argument("--base", default=None, help="also run each config with the busted package of this tree")
    a = ap.parse_args()
    from busted.policy.enforce import cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        sys.exit("no cgroup v2 mount")
    name = f"busted-bench-enforce-{os.getpid()}"
    Path(mount, name).mkdir()
    try:
        res: dict[str, list[dict]] = {}
        roots = {"": ROOT} | ({"@base": Path(a.base).resolve()} if a.base else {})
        configs = [(cfg + tag, cfg, root) for cfg in a.configs.split(",") for tag, root in roots.items()]
        for _label, cfg, root in configs:
            one(cfg, "/" + name, root)  # warm-up: the bytecode cache
        for _ in range(a.runs):  # configs alternate run by run: drift on a shared host hits both
            for label, cfg, root in configs:
                res.setdefault(label, []).append(one(cfg, "/" + name, root))
    finally:
        for _ in range(50):  # bounded: the children are gone, the cgroup empties at once
            try:
                Path(mount, name).rmdir()
                break
            except OSError:
                time.sleep(0.1)
    summary = {}
    for cfg, rs in res.items():
        summary[cfg] = {
            "runs": len(rs),
            "start_s_median": round(statistics.median(r["start_s"] for r in rs), 3),
            "rss_mb_median": round(statistics.median(r["rss_mb"] for r in rs), 1),
            "maxrss_mb_median": round(statistics.median(r["maxrss_mb"] for r in rs), 1),
            "bcc_or_llvm_in_process": any(r["bcc"] or r["llvm"] for r in rs),
            "busted_from": sorted({str(Path(r["busted"]).parent.parent) for r in rs}),
            "start_s": [round(r["start_s"], 3) for r in rs],
            "maxrss_mb": [round(r["maxrss_mb"], 1) for r in rs],
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
