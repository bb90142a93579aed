"""exe and container rules enforced in the kernel (issue 22, acceptance 1, 3 and 4), on real lab
traffic: the exec'd program's path and the caller's container cgroup are checked at connect.
"Reached" is the lab server's own log."""

import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import collect
from scopes import scope_cgroup

import busted
from busted import Policy, PolicyDecision

PY_HTTPX = ("import httpx, sys\n"
            "r = httpx.post(sys.argv[1], json={'model': 'claude-3-5-sonnet-latest', 'max_tokens': 8,"
            " 'messages': [{'role': 'user', 'content': 'hi'}]}, headers={'x-api-key': 'k',"
            " 'anthropic-version': '2023-06-01'}, timeout=5)\n"
            "print(r.status_code)\n")
# the system interpreter without the venv (no httpx): the standard library's client
PY_URLLIB = ("import sys, urllib.request\nsys.stdin.readline()\n"
             "print(urllib.request.urlopen(sys.argv[1], data=b'{}', timeout=5).status)\n")
URL = "https://api.anthropic.com/v1/messages"
OPENAI = "https://api.openai.com/v1/models"


@pytest.fixture(scope="module")
def cgroup():
    with scope_cgroup("busted-exe-test") as path:
        yield path


def _into(cg):
    def pre() -> None:
        (cg / "cgroup.procs").write_text("0")

    return pre


def run(lab, argv, cg, timeout=20.0):
    return subprocess.run(lab.client_cmd(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          preexec_fn=_into(cg))


def curl(url, marker, extra=()):
    return ["curl", "-sS", "--fail", "-m", "5", *extra, f"{url}?m={marker}"]


def reached(lab, marker):
    return [r for r in lab.http_requests() if marker in str(r)]


def denials(evs):
    return [d for d in evs if isinstance(d, PolicyDecision) and d.enforced]


def test_exe_rule_stops_curl_and_lets_python_through(lab, cgroup):
    """Acceptance 1 (exe): curl -> anthropic is refused at connect and reaches no server; python
    (httpx) -> anthropic works; the decision names the rule and the exe seen."""
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "curl-may-not-call-anthropic", "action": "deny", "provider": "anthropic", "exe": "/usr/bin/curl"}]})
    mc, mp = uuid.uuid4().hex, uuid.uuid4().hex
    with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
        c = run(lab, curl(URL, mc), cgroup)
        p = run(lab, [sys.executable, "-c", PY_HTTPX, f"{URL}?m={mp}"], cgroup)
        evs = collect(mon, lambda e: len(denials(e)) >= 1, timeout=10)
    assert c.returncode == 7, c.stderr  # connect() refused: EPERM
    assert p.returncode == 0 and p.stdout.strip() == b"200", p.stderr
    assert reached(lab, mc) == [] and len(reached(lab, mp)) == 1
    d = denials(evs)
    assert d and all(x.rule == "curl-may-not-call-anthropic" and x.point == "connect" for x in d)
    assert d[0].exe == "/usr/bin/curl" and ("exe", "/usr/bin/curl") in d[0].matched
    assert ("provider", "anthropic") in d[0].matched and d[0].comm == "curl"


def test_fork_inherits_exec_replaces_and_older_processes_are_seeded(lab, cgroup):
    """Acceptance 3: under a deny on this python, a child it forks is refused (inherited), the curl
    it execs into works (the exec replaced the program), and a python started before the monitor
    (seeded from /proc/PID/exe) is refused, and so is one exec'd by a relative filename (resolved
    from /proc/PID/exe); `sh -c 'exec curl'` under a curl rule (for openai) is refused: sh's
    verdict was replaced by curl's."""
    py = sys.executable
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "not-this-python", "action": "deny", "provider": "anthropic", "exe": py},
        {"name": "not-curl", "action": "deny", "provider": "openai", "exe": "/usr/bin/curl"}]})
    m_fork, m_exec, m_old, m_sh, m_self, m_rel = (uuid.uuid4().hex for _ in range(6))
    real = os.path.realpath(py)
    real_dir, real_name = os.path.split(real)
    rel = None
    fork = (PY_HTTPX.replace("import httpx, sys\n", "import httpx, os, sys\npid = os.fork()\nif pid:\n"
                             "    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"))
    exec_curl = "import os, sys; os.execv('/usr/bin/curl', ['curl', '-sS', '--fail', '-m', '5', sys.argv[1]])"
    # started before the monitor: its exec is not seen by the tracepoints, /proc tells
    old = subprocess.Popen(lab.client_cmd([py, "-c", "import sys; sys.stdin.readline()\n" + PY_HTTPX,
                                           f"{URL}?m={m_old}"]),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=_into(cgroup))
    try:
        deadline = time.monotonic() + 10
        while b"python" not in _exe_bytes(old.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # ip netns exec -> env -> python: wait until it runs python
        with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
            enf = mon._policy_rt.enforcer
            assert enf.exe_of(old.pid) == os.path.realpath(py)  # seeded
            out, err = old.communicate(b"go\n", timeout=20)
            r_fork = run(lab, [py, "-c", fork, f"{URL}?m={m_fork}"], cgroup)
            r_exec = run(lab, [py, "-c", exec_curl, f"{URL}?m={m_exec}"], cgroup)
            r_sh = run(lab, ["sh", "-c", f"exec curl -sS --fail -m 5 '{OPENAI}?m={m_sh}'"], cgroup)
            r_self = run(lab, [py, "-c", PY_HTTPX, f"{URL}?m={m_self}"], cgroup)
            # exec'd by a relative filename: the kernel holds "./python3.11" until user space
            # rewrites it from /proc/PID/exe; the client waits for that, then connects
            rel = subprocess.Popen(lab.client_cmd(["sh", "-c", 'cd "$0" && exec ./"$1" -c "$2" "$3"', real_dir,
                                                   real_name, PY_URLLIB, f"{URL}?m={m_rel}"]),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=_into(cgroup))
            deadline = time.monotonic() + 10
            seen: list = []
            while enf.exe_of(rel.pid) != real and time.monotonic() < deadline:
                seen += mon.events(timeout=0.05)  # the reader reads the exec record
            assert enf.exe_of(rel.pid) == real
            _, rel_err = rel.communicate(b"go\n", timeout=20)
            evs = seen + collect(mon, lambda e: len({d.pid for d in denials(seen + e)}) >= 5, timeout=10)
    finally:
        for p in (old, rel):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert old.returncode != 0 and b"Operation not permitted" in err, (out, err)
    assert r_fork.returncode != 0 and b"Operation not permitted" in r_fork.stderr, r_fork.stderr
    assert r_exec.returncode == 0, r_exec.stderr
    assert r_sh.returncode == 7 and r_self.returncode != 0
    assert reached(lab, m_old) == [] and reached(lab, m_fork) == [] and reached(lab, m_sh) == []
    assert reached(lab, m_self) == [] and len(reached(lab, m_exec)) == 1
    assert rel.returncode != 0 and b"Operation not permitted" in rel_err and reached(lab, m_rel) == [], rel_err
    d = denials(evs)
    by_rule = {(x.rule, x.exe) for x in d}
    assert ("not-curl", "/usr/bin/curl") in by_rule  # sh exec'd curl: curl's verdict
    assert {x.pid for x in d if x.rule == "not-this-python"} >= {old.pid}
    assert len({x.pid for x in d if x.rule == "not-this-python"}) >= 4  # old, fork child, itself, relative
    assert {x.exe for x in d if x.rule == "not-this-python"} <= {py, real}


def _exe_bytes(pid):
    try:
        return os.fsencode(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return b""


def test_container_rule_by_cgroup_ancestry(lab, cgroup):
    """Acceptance 1 (container): clients in docker-named cgroups under a `container` deny for
    openai fail and reach no server, whether the container's cgroup existed at load (cgroupfs walk)
    or was made after it (cgroup_mkdir); the same client outside works; anthropic is not touched."""
    base = "b0575ed" + uuid.uuid4().hex[:9]
    early = cgroup / f"docker-{base}{'1' * 48}.scope"
    late = cgroup / f"docker-{base}{'2' * 48}.scope"
    nested = early / "init.scope"  # a process below the container's top cgroup
    nested.mkdir(parents=True)
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-openai-in-b0575ed", "action": "deny", "provider": "openai", "container": base}]})
    m_early, m_late, m_out, m_other = (uuid.uuid4().hex for _ in range(4))
    try:
        with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
            enf = mon._policy_rt.enforcer
            late.mkdir()
            ino = late.stat().st_ino
            deadline = time.monotonic() + 10
            while ino not in enf.compiled.ctr and time.monotonic() < deadline:
                list(mon.events(timeout=0.1))  # the reader applies the cgroup_mkdir record
            assert ino in enf.compiled.ctr
            r_early = run(lab, curl(OPENAI, m_early), nested)
            r_late = run(lab, curl(OPENAI, m_late), late)
            r_out = run(lab, curl(OPENAI, m_out), cgroup)
            r_other = run(lab, curl("https://api.anthropic.com/v1/models", m_other), late)
            evs = collect(mon, lambda e: len({x.pid for x in denials(e)}) >= 2, timeout=10)
    finally:
        for d in (nested, early, late):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    assert r_early.returncode == 7 and r_late.returncode == 7, (r_early.stderr, r_late.stderr)
    assert r_out.returncode == 0 and r_other.returncode == 0, (r_out.stderr, r_other.stderr)
    assert reached(lab, m_early) == [] and reached(lab, m_late) == []
    assert len(reached(lab, m_out)) == 1 and len(reached(lab, m_other)) == 1
    d = denials(evs)
    assert {x.rule for x in d} == {"no-openai-in-b0575ed"}
    cids = {dict(x.matched).get("container") for x in d}
    assert cids == {f"{base}{'1' * 48}", f"{base}{'2' * 48}"}
    assert all(x.exe == "/usr/bin/curl" and x.provider == "openai" for x in d)


def test_container_rule_at_the_client_hello(lab, cgroup):
    """No DNS answer (curl --resolve): connect cannot name the provider, the SNI does; the socket's
    cgroup ancestry (bpf_skb_ancestor_cgroup_id) puts it in the container: its hello is dropped and
    the server sees no request; the same client outside the container gets through."""
    shared = lab.hosts["api.openai.com"]
    if "api.deepseek.com" not in lab.hosts:
        lab.add_server_ip("api.deepseek.com", ip=shared.ipv4, ip6=shared.ipv6)
    cid = "c0ffee" + uuid.uuid4().hex + uuid.uuid4().hex[:26]
    ctr = cgroup / f"docker-{cid}.scope"
    ctr.mkdir()
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-deepseek-in-c0ffee", "action": "deny", "provider": "deepseek", "container": "c0ffee"}]})
    m_in, m_out = uuid.uuid4().hex, uuid.uuid4().hex
    resolve = ["--resolve", f"api.deepseek.com:443:{shared.ipv4}"]
    try:
        with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
            r_in = run(lab, curl("https://api.deepseek.com/v1/models", m_in, resolve), ctr)
            r_out = run(lab, curl("https://api.deepseek.com/v1/models", m_out, resolve), cgroup)
            evs = collect(mon, lambda e: len(denials(e)) >= 1, timeout=10)
    finally:
        for _ in range(50):
            try:
                ctr.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert r_in.returncode != 0 and r_out.returncode == 0, (r_in.stderr, r_out.stderr)
    assert reached(lab, m_in) == [] and len(reached(lab, m_out)) == 1
    d = denials(evs)
    assert {(x.rule, x.point) for x in d} == {("no-deepseek-in-c0ffee", "tls_client_hello")}
    assert ("container", cid) in d[0].matched and ("sni", "api.deepseek.com") in d[0].matched


# A messages call of exactly 20 tokens in the lab (as in test_policy_lab.py)
PY_20_TOKENS = """
import httpx, sys
head, tail = b'{"model":"lab","max_tokens":1,"messages":[{"role":"user","content":"', b'"}]}'
body = head + b"x" * (76 - len(head) - len(tail)) + tail
r = httpx.post(sys.argv[1], content=body, timeout=5, headers={
    "x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"})
print(r.status_code, r.json()["usage"]["input_tokens"] + r.json()["usage"]["output_tokens"])
"""


def test_token_budget_per_container_is_refused_in_the_kernel(lab, cgroup):
    """A deny budget of 30 tokens per container for anthropic: two 20-token calls from inside a
    docker-named cgroup work, the third from inside (a cgroup below it) is refused at connect and
    reaches no server; the same client outside any container still works; the event names it."""
    from busted import BudgetExceeded
    from busted.policy.budgets import window_of

    wait = window_of(time.time(), 86400)[1] - time.time()
    if wait < 120:  # all calls in one window: wait out a day's end (bounded: 2 minutes)
        time.sleep(wait + 1)
    cid = "d0c4e7" + uuid.uuid4().hex + uuid.uuid4().hex[:26]
    ctr = cgroup / f"docker-{cid}.scope"
    sub = ctr / "worker"
    pol = Policy.from_dict({"default": "audit", "budgets": [
        {"name": "ctr-30", "provider": "anthropic", "per": "container", "limit_tokens": 30, "window": "1d",
         "action": "deny"}]})
    m, o = uuid.uuid4().hex, uuid.uuid4().hex
    url = f"{URL}?m={m}"
    try:
        with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
            sub.mkdir(parents=True)  # a container started after the monitor (cgroup_mkdir)
            enf = mon._policy_rt.enforcer
            deadline = time.monotonic() + 10
            evs: list = []
            while ctr.stat().st_ino not in enf.compiled.ctr and time.monotonic() < deadline:
                evs += mon.events(timeout=0.1)
            first = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], ctr)
            second = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], ctr)
            evs += collect(mon, lambda e: any(isinstance(x, BudgetExceeded) for x in evs + e), timeout=10)
            third = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], sub)
            outside = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, f"{URL}?m={o}"], cgroup)
            evs += collect(mon, lambda e: any(isinstance(x, PolicyDecision) and x.enforced for x in evs + e),
                           timeout=10)
    finally:
        for d in (sub, ctr):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    assert first.stdout.split() == [b"200", b"20"] and second.stdout.split() == [b"200", b"20"], (
        first.stderr, second.stderr)
    assert third.returncode != 0 and b"Operation not permitted" in third.stderr, third.stderr
    assert outside.stdout.split() == [b"200", b"20"], outside.stderr
    assert len(reached(lab, m)) == 2 and len(reached(lab, o)) == 1  # the server's own log
    ex = [e for e in evs if isinstance(e, BudgetExceeded)]
    assert [(e.budget, e.per, e.scope, e.tokens, e.enforced) for e in ex] == [("ctr-30", "container", cid, 40, True)]
    d = denials(evs)
    assert [(x.rule, x.point) for x in d] == [("budget:ctr-30", "connect")]
    assert ("budget", "ctr-30") in d[0].matched


PY_TLS_SNI = """
import socket, ssl, sys
ip, name, marker = sys.argv[1:4]
s = ssl.create_default_context().wrap_socket(socket.create_connection((ip, 443), timeout=5), server_hostname=name)
s.sendall(f"GET /v1/models?m={marker} HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n".encode())
print(s.recv(64).split(b"\\r\\n", 1)[0].decode())
"""


def test_exe_rule_at_the_client_hello(lab, cgroup):
    """No DNS answer (curl --resolve): connect cannot name the provider, the SNI does; the exe of the
    process that connected the socket (noted per socket cookie at connect) decides there: curl's
    hello is dropped and reaches no server, python's with the same SNI and address goes through."""
    shared = lab.hosts["api.openai.com"]
    if "api.deepseek.com" not in lab.hosts:
        lab.add_server_ip("api.deepseek.com", ip=shared.ipv4, ip6=shared.ipv6)
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "curl-no-deepseek", "action": "deny", "provider": "deepseek", "exe": "/usr/bin/curl"}]})
    mc, mp = uuid.uuid4().hex, uuid.uuid4().hex
    with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
        c = run(lab, curl("https://api.deepseek.com/v1/models", mc,
                          ["--resolve", f"api.deepseek.com:443:{shared.ipv4}"]), cgroup)
        p = run(lab, [sys.executable, "-I", "-c", PY_TLS_SNI, shared.ipv4, "api.deepseek.com", mp], cgroup)
        evs = collect(mon, lambda e: len(denials(e)) >= 1, timeout=10)
    assert c.returncode != 0 and p.returncode == 0 and p.stdout.startswith(b"HTTP/1.1"), (c.stderr, p.stderr)
    assert reached(lab, mc) == [] and len(reached(lab, mp)) == 1
    d = denials(evs)
    assert {(x.rule, x.point) for x in d} == {("curl-no-deepseek", "tls_client_hello")}
    assert ("sni", "api.deepseek.com") in d[0].matched
