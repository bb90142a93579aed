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


ENFORCE_CHILD = """
import json, sys, busted
pol = busted.Policy.from_dict({"default": "audit", "rules": [
    {"name": "no-deepseek", "action": "deny", "provider": "deepseek"},
    {"name": "no-big-model", "action": "deny", "model": "gpt-4o"}]})
m = busted.Monitor(preexisting=False, policy=pol, enforce=True, policy_scope=sys.argv[1]).start()
enf = m._policy_rt.enforcer
maps = open("/proc/self/maps").read()
print(json.dumps({"bcc": "bcc" in sys.modules,
                  "llvm": "libLLVM" in maps or "libclang" in maps or "libbcc" in maps,
                  "bytecode": enf.obj.bytecode_from, "links": len(enf._links),
                  "model_links": len(enf.models._links), "gen": enf.generation}))
m.close()
"""


def test_enforcement_loads_without_bcc_in_the_monitor_and_from_the_cache(tmp_path):
    """Issue 21, "One BPF stack": with enforce=True the policy programs (cgroup sock_addr, skb,
    sock_ops, the exe/cgroup tracepoints, the model programs) are compiled in the child and
    loaded by busted's own loader too: no BCC or LLVM in the monitor, the second start from the
    cache. The programs' effect is what tests/kernel/test_policy_*.py check."""
    import os

    from scopes import scope_cgroup

    env = dict(os.environ, BUSTED_BPF_CACHE=str(tmp_path / "bpf"))
    out = []
    with scope_cgroup("busted-loader") as cg:
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", ENFORCE_CHILD, "/" + cg.name], capture_output=True,
                               text=True, timeout=300, env=env)
            assert p.returncode == 0, p.stderr[-2000:]
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    first, second = out
    assert first["bytecode"] == "compile" and second["bytecode"] == "cache"
    for r in out:
        assert not r["bcc"] and not r["llvm"], r
        assert r["links"] == 10  # 5 tracepoints, 5 cgroup programs
        assert r["model_links"] >= 2  # the model rule's egress program and send tracepoint
        assert r["gen"] == 0
