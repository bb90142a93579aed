"""The monitor loads its programs without BCC: bytecode from a compiler child or the cache."""

import json
import subprocess
import sys

CHILD = """
import json, sys, busted
m = busted.Monitor(preexisting=False).start()
maps = open("/proc/self/maps").read()
st = m.stats()
print(json.dumps({"bcc": "bcc" in sys.modules, "llvm": "libLLVM" in maps or "libclang" in maps,
                  "bytecode": st.bytecode, "attached": len(m._program.attached)}))
m.close()
"""


def run_child(env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_monitor_never_maps_llvm_and_the_second_start_uses_the_cache(tmp_path):
    cache = {"BUSTED_BPF_CACHE": str(tmp_path / "bpf")}
    first = run_child(cache)
    second = run_child(cache)
    assert first["bytecode"] == "compile" and second["bytecode"] == "cache"
    for r in (first, second):
        assert not r["bcc"] and not r["llvm"]
        assert r["attached"] >= 3
    assert first["attached"] == second["attached"]
