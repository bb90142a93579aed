"""Policies on real lab traffic: dry run, enforcement at connect (right after a fresh DNS answer),
at the TLS ClientHello (an address shared by an allowed and a denied name), hot reload, and
nothing left attached after exit or SIGKILL. Clients run in a test cgroup (the scope)."""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import collect
from scopes import scope_cgroup

import busted
from busted import FlowOpened, Policy, PolicyDecision, PolicyError

DENY_ANTHROPIC = {"default": "audit", "rules": [
    {"name": "no-anthropic", "action": "deny", "provider": "anthropic"},
]}
PY_HTTPX = ("import httpx, sys\n"
            "r = httpx.post(sys.argv[1], json={'model': 'claude-3-5-sonnet-latest', 'max_tokens': 8,"
            " 'messages': [{'role': 'user', 'content': 'hi'}]}, headers={'x-api-key': 'k',"
            " 'anthropic-version': '2023-06-01'}, timeout=5)\n"
            "print(r.status_code)\n")


@pytest.fixture(scope="module")
def cgroup():
    """A cgroup v2 directory for the clients: the enforcement scope."""
    with scope_cgroup("busted-policy-test") as path:
        yield path


def _into(cg: Path | None):
    def pre() -> None:
        if cg is not None:
            (cg / "cgroup.procs").write_text("0")

    return pre


def run(lab, argv, cg, timeout=20.0, stdin=None):
    """Run a lab client in cgroup ``cg`` (None: the root); put there before ``ip netns exec``."""
    t0 = time.monotonic()
    try:
        return _run(lab, argv, cg, timeout, stdin)
    finally:
        print(f"{argv[0]} took {time.monotonic() - t0:.3f}s")


def _run(lab, argv, cg, timeout, stdin):
    return subprocess.run(lab.client_cmd(argv), capture_output=True, timeout=timeout, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL, preexec_fn=_into(cg))


def curl(url, marker, extra=()):
    return ["curl", "-sS", "--fail", "-m", "5", *extra, f"{url}?m={marker}"]


def requests_with(lab, marker):
    return [r for r in lab.http_requests() if marker in str(r)]


def ours_attached() -> str:
    out = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if "pol_" in line)


def test_dry_run_reports_and_blocks_nothing(lab, cgroup):
    m = uuid.uuid4().hex
    with busted.Monitor(policy=Policy.from_dict(DENY_ANTHROPIC)) as mon:
        assert ours_attached() == ""  # a dry run loads nothing extra
        a = run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup)
        o = run(lab, curl("https://api.openai.com/v1/models", m), cgroup)
        evs = collect(mon, lambda e: sum(isinstance(x, PolicyDecision) for x in e) >= 2, timeout=10)
    assert a.returncode == 0 and o.returncode == 0, (a.stderr, o.stderr)
    assert len(requests_with(lab, m)) == 2
    dec = {(d.provider, d.rule, d.action, d.enforced, d.comm) for d in evs if isinstance(d, PolicyDecision)}
    assert ("anthropic", "no-anthropic", "deny", False, "curl") in dec
    assert ("openai", "default", "audit", False, "curl") in dec
    d = next(d for d in evs if isinstance(d, PolicyDecision) and d.provider == "anthropic")
    opened = {e.flow_id for e in evs if isinstance(e, FlowOpened)}
    assert d.flow_id in opened and d.point in ("connect", "tls_client_hello")


@pytest.mark.parametrize("kernel_dns_only", [False, True], ids=["dns-both", "dns-bpf-only"])
def test_enforce_at_connect_curl_httpx_openssl(lab, cgroup, monkeypatch, kernel_dns_only):
    """The first connection after a fresh DNS answer is refused: with user space's map updates
    turned off, only the BPF DNS parser can have mapped the address in time."""
    if kernel_dns_only:
        from busted.policy.enforce import Enforcer

        monkeypatch.setattr(Enforcer, "learn_dns", lambda self, ev, uid=None: None)
    m, out_m = uuid.uuid4().hex, uuid.uuid4().hex
    ca = str(lab.ca_path)
    with busted.Monitor(policy=Policy.from_dict(DENY_ANTHROPIC), enforce=True,
                        policy_scope="/" + cgroup.name) as mon:
        assert "pol_connect4" in ours_attached()
        results = {
            "curl": run(lab, curl("https://api.anthropic.com/v1/messages", m), cgroup),
            "python": run(lab, [sys.executable, "-c", PY_HTTPX, f"https://api.anthropic.com/v1/messages?m={m}"],
                          cgroup),
            "openssl": run(lab, ["openssl", "s_client", "-connect", "api.anthropic.com:443", "-servername",
                                 "api.anthropic.com", "-CAfile", ca, "-quiet"], cgroup,
                           stdin=f"GET /?m={m} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n".encode()),
            "audited": run(lab, curl("https://api.openai.com/v1/models", m), cgroup),
            "outside": run(lab, curl("https://api.anthropic.com/v1/models", out_m), None),
        }
        evs = collect(mon, lambda e: sum(isinstance(x, PolicyDecision) and x.enforced for x in e) >= 3
                      and any(isinstance(x, PolicyDecision) and x.action == "audit" for x in e), timeout=10)
    for name in ("curl", "python", "openssl"):
        r = results[name]
        assert r.returncode != 0, (name, r.stdout, r.stderr)
    assert results["curl"].returncode == 7  # "Failed to connect ... Couldn't connect to server" (EPERM)
    assert b"PermissionError" in results["python"].stderr or b"Operation not permitted" in results["python"].stderr
    assert results["audited"].returncode == 0 and results["outside"].returncode == 0
    reqs = requests_with(lab, m)
    assert len(reqs) == 1 and "anthropic" not in str(reqs)  # only the audited openai call arrived
    assert len(requests_with(lab, out_m)) == 1
    denied = [d for d in evs if isinstance(d, PolicyDecision) and d.enforced]
    comms = {d.comm for d in denied}
    assert {"curl", "openssl"} <= comms and any(c.startswith("python") for c in comms), comms
    assert all((d.rule, d.action, d.point, d.dport) == ("no-anthropic", "deny", "connect", 443) for d in denied)
    assert {d.daddr for d in denied} <= {lab.hosts["api.anthropic.com"].ipv4, lab.hosts["api.anthropic.com"].ipv6}
    assert len({d.pid for d in denied}) >= 3
    assert any(isinstance(d, PolicyDecision) and (d.provider, d.action, d.enforced) == ("openai", "audit", False)
               for d in evs)
    assert ours_attached() == ""


PY_V6_CONNECTS = r"""
import json, socket, sys
infos = socket.getaddrinfo(sys.argv[1], 443, proto=socket.IPPROTO_TCP)
v4 = next(i[4][0] for i in infos if i[0] == socket.AF_INET)
v6 = next(i[4][0] for i in infos if i[0] == socket.AF_INET6)
out = {}
for name, addr in (("to_mapped", "::ffff:" + v4), ("to_v6", v6)):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, 443))
        out[name] = "connected"
    except OSError as exc:
        out[name] = exc.errno
    finally:
        s.close()
print(json.dumps({"v4": v4, "v6": v6, **out}))
"""


def test_enforce_ipv6_and_v4_mapped_connects(lab, cgroup):
    """pol_connect6 judges both kinds of address an AF_INET6 socket connects to: an IPv6 one, and
    an IPv4-mapped one (::ffff:a.b.c.d, judged and reported as the IPv4 address); an audited
    provider's connects go through either way."""
    import errno
    import json

    with busted.Monitor(policy=Policy.from_dict(DENY_ANTHROPIC), enforce=True,
                        policy_scope="/" + cgroup.name) as mon:
        denied = run(lab, [sys.executable, "-c", PY_V6_CONNECTS, "api.anthropic.com"], cgroup)
        audited = run(lab, [sys.executable, "-c", PY_V6_CONNECTS, "api.openai.com"], cgroup)
        evs = collect(mon, lambda e: sum(isinstance(x, PolicyDecision) and x.enforced for x in e) >= 2,
                      timeout=10)
    assert denied.returncode == 0 and audited.returncode == 0, (denied.stderr, audited.stderr)
    d, a = json.loads(denied.stdout), json.loads(audited.stdout)
    assert (d["to_mapped"], d["to_v6"]) == (errno.EPERM, errno.EPERM), d
    assert (a["to_mapped"], a["to_v6"]) == ("connected", "connected"), a
    refused = {(x.daddr, x.point, x.rule, x.dport) for x in evs if isinstance(x, PolicyDecision) and x.enforced}
    assert refused == {(d["v4"], "connect", "no-anthropic", 443), (d["v6"], "connect", "no-anthropic", 443)}


def test_enforce_by_sni_on_a_shared_address(lab, cgroup):
    """api.deepseek.com served on api.openai.com's address: openai works, deepseek's hello is
    stopped in the kernel and the server sees no request."""
    shared = lab.hosts["api.openai.com"]
    if "api.deepseek.com" not in lab.hosts:
        lab.add_server_ip("api.deepseek.com", ip=shared.ipv4, ip6=shared.ipv6)
    m, ds_m = uuid.uuid4().hex, uuid.uuid4().hex
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-deepseek", "action": "deny", "provider": "deepseek"}]})
    with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
        ok = run(lab, curl("https://api.openai.com/v1/models", m), cgroup)
        # --resolve: no DNS answer, so only the SNI can name the denied provider
        t0 = time.monotonic()
        bad = run(lab, curl("https://api.deepseek.com/v1/models", ds_m,
                            ("--resolve", f"api.deepseek.com:443:{shared.ipv4}")), cgroup)
        took = time.monotonic() - t0
        evs = collect(mon, lambda e: any(isinstance(x, PolicyDecision) and x.enforced for x in e), timeout=10)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0
    assert requests_with(lab, ds_m) == [] and len(requests_with(lab, m)) == 1
    d = next(d for d in evs if isinstance(d, PolicyDecision) and d.enforced)
    assert (d.rule, d.point, d.daddr, d.dport) == ("no-deepseek", "tls_client_hello", shared.ipv4, 443)
    assert took < 2.0, f"the client should fail fast (TCP_USER_TIMEOUT), took {took:.2f}s: {bad.stderr!r}"
    print(f"SNI-denied curl failed after {took:.3f}s: {bad.stderr.decode(errors='replace').strip()}")


def test_hot_reload_next_connect(lab, cgroup, tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nname = "no-anthropic"\naction = "deny"\nprovider = "anthropic"\n')
    m = uuid.uuid4().hex
    with busted.Monitor(policy=Policy.load(f), enforce=True, policy_scope="/" + cgroup.name) as mon:
        assert run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup).returncode != 0
        f.write_text('[[rules]]\nname = "yes-anthropic"\naction = "allow"\nprovider = "anthropic"\n')
        mon.set_policy(f)
        r = run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup)
        assert r.returncode == 0, r.stderr
        f.write_text('[[rules]]\nname = "x"\naction = "block"\n')
        with pytest.raises(PolicyError, match=f"{f}:3:"):
            mon.set_policy(f)
        assert mon.policy.rules[0].name == "yes-anthropic"
        assert run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup).returncode == 0
    assert len(requests_with(lab, m)) == 2


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_nothing_left_after_exit_or_sigkill(lab, cgroup, tmp_path, how):
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nname = "no-anthropic"\naction = "deny"\nprovider = "anthropic"\n')
    busted_cli = [sys.executable, "-m", "busted.cli", "monitor", "--json", "--policy", str(f), "--enforce",
                  "--policy-scope", "/" + cgroup.name]
    proc = subprocess.Popen(busted_cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while ours_attached().count("pol_") < 5:  # all five cgroup programs
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        m = uuid.uuid4().hex
        assert run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup).returncode != 0
        if how == "sigkill":
            proc.kill()
        else:
            proc.terminate()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ours_attached() == ""
    r = run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup)
    assert r.returncode == 0, r.stderr
    assert len(requests_with(lab, m)) == 1



def test_process_keys_are_checked_in_the_kernel(lab, cgroup):
    """First match wins in the kernel too: a cgroup allow before a comm deny."""
    svc = cgroup / "svc"
    svc.mkdir(exist_ok=True)
    try:
        pol = Policy.from_dict({"default": "audit", "rules": [
            {"name": "svc-may", "action": "allow", "provider": "anthropic", "cgroup": f"/{cgroup.name}/svc"},
            {"name": "curl-may-not", "action": "deny", "provider": "anthropic", "comm": "curl"}]})
        m = uuid.uuid4().hex
        url = "https://api.anthropic.com/v1/models"
        with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name):
            denied = run(lab, curl(url, m), cgroup)
            in_svc = run(lab, curl(url, m), svc)
            py = run(lab, [sys.executable, "-c", PY_HTTPX, f"{url}?m={m}"], cgroup)
        assert denied.returncode == 7
        assert in_svc.returncode == 0, in_svc.stderr
        assert py.returncode == 0 and py.stdout.strip() == b"200", py.stderr
        assert len(requests_with(lab, m)) == 2
    finally:
        svc.rmdir()


def test_measure_dns_answer_to_connect_race(lab, cgroup):
    """How long a client takes from reading a DNS answer to connect(), against how long user space
    takes to map that answer: why the BPF DNS parser exists. Printed for docs/policy.md."""
    m = uuid.uuid4().hex
    with busted.Monitor(policy=Policy.from_dict(DENY_ANTHROPIC), enforce=True,
                        policy_scope="/" + cgroup.name) as mon:
        rcs = [run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup).returncode for _ in range(20)]
        evs = collect(mon, lambda e: sum(isinstance(x, PolicyDecision) and x.enforced for x in e) >= 20, timeout=10)
        lag = sorted(mon._policy_rt.dns_lag_ns)
        learn = sorted(mon._policy_rt.dns_learn_s)
    assert rcs == [7] * 20 and requests_with(lab, m) == []
    answers = {}
    for e in evs:
        if isinstance(e, busted.DnsAnswer) and e.qname == "api.anthropic.com" and e.addresses:
            answers.setdefault(e.pid, e.ts_ns)
    gaps = sorted(d.ts_ns - answers[d.pid] for d in evs
                  if isinstance(d, PolicyDecision) and d.enforced and d.pid in answers)
    assert len(gaps) >= 10 and lag
    med = lambda xs: xs[len(xs) // 2]  # noqa: E731
    print(f"\nanswer read -> connect(): median {med(gaps) / 1e3:.0f} us, max {gaps[-1] / 1e3:.0f} us (n={len(gaps)})"
          f"\nanswer read -> mapped by user space: median {med(lag) / 1e3:.0f} us, max {lag[-1] / 1e3:.0f} us"
          f" (n={len(lag)}); map update itself: median {med(learn) * 1e6:.0f} us")


def test_cli_sighup_reload(lab, cgroup, tmp_path):
    """SIGHUP: a valid file takes effect for the next connect; an invalid one keeps the old policy
    and says why (stderr lines announce both)."""
    import select
    import signal

    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nname = "no-anthropic"\naction = "deny"\nprovider = "anthropic"\n')
    argv = [sys.executable, "-m", "busted.cli", "monitor", "--json", "--policy", str(f), "--enforce",
            "--policy-scope", "/" + cgroup.name]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stderr_line(timeout=15.0):
        """The next stderr line about the policy (other lines, e.g. a ready line, are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                line = proc.stderr.readline()
                if "policy" in line:
                    return line
        raise AssertionError("no policy line on stderr")

    try:
        deadline = time.monotonic() + 30
        while ours_attached().count("pol_") < 5:  # all five cgroup programs
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        m = uuid.uuid4().hex
        url = "https://api.anthropic.com/v1/models"
        assert run(lab, curl(url, m), cgroup).returncode == 7
        f.write_text('[[rules]]\nname = "yes"\naction = "allow"\nprovider = "anthropic"\n')
        proc.send_signal(signal.SIGHUP)
        assert "policy reloaded" in stderr_line()
        assert run(lab, curl(url, m), cgroup).returncode == 0
        f.write_text('[[rules]]\nname = "yes"\naction = "allow"\nprovder = "anthropic"\n')
        proc.send_signal(signal.SIGHUP)
        line = stderr_line()
        assert "not reloaded" in line and f"{f}:4:" in line and "provder" in line
        assert run(lab, curl(url, m), cgroup).returncode == 0
        assert len(requests_with(lab, m)) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# A messages call of exactly 20 tokens in the lab (docs/lab.md): a 76-byte body is T = 19 input
# tokens, and max_tokens 1 is N = 1 output token.
PY_20_TOKENS = """
import httpx, sys
head, tail = b'{"model":"lab","max_tokens":1,"messages":[{"role":"user","content":"', b'"}]}'
body = head + b"x" * (76 - len(head) - len(tail)) + tail
r = httpx.post(sys.argv[1], content=body, timeout=5, headers={
    "x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"})
print(r.status_code, r.json()["usage"]["input_tokens"] + r.json()["usage"]["output_tokens"])
"""


@pytest.mark.parametrize("per", ["uid", "cgroup", "exe"])
def test_token_budget_per_uid_stops_the_third_call(lab, cgroup, per):
    """Issue 22 acceptance 3: 30 tokens per uid for anthropic; two 20-token calls work, the third is
    refused at connect (the lab server never sees it), the events name the budget; openai works.
    Per cgroup (the caller's own cgroup id in the kernel), with a reload between the second and the
    third call that moves the budget to another kernel index: the block follows it. Per exe (the
    exec'd filename the kernel keeps per process, hashed): the python client is refused, curl not."""
    from busted import BudgetExceeded, BudgetSpend, LlmCall
    from busted.policy.budgets import window_of

    wait = window_of(time.time(), 86400)[1] - time.time()
    if wait < 120:  # all three calls in one window: wait out a day's end (bounded: 2 minutes)
        time.sleep(wait + 1)
    b30 = {"name": "anthropic-30", "provider": "anthropic", "per": per, "limit_tokens": 30, "window": "1d",
           "action": "deny"}
    pol = Policy.from_dict({"default": "audit", "budgets": [b30]})
    scope = {"uid": "0", "exe": sys.executable}.get(per) or str(cgroup.stat().st_ino)
    m, o = uuid.uuid4().hex, uuid.uuid4().hex
    url = f"https://api.anthropic.com/v1/messages?m={m}"
    with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name) as mon:
        first = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], cgroup)
        evs = collect(mon, lambda e: any(isinstance(x, BudgetSpend) for x in e), timeout=10)
        second = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], cgroup)
        evs += collect(mon, lambda e: any(isinstance(x, BudgetExceeded) for x in e), timeout=10)
        if per == "cgroup":
            first_budget = {"name": "mistral-big", "provider": "mistral", "per": "uid", "limit_tokens": 10**9,
                            "window": "1d", "action": "deny"}
            mon.set_policy(Policy.from_dict({"default": "audit", "budgets": [first_budget, b30]}))
            assert mon._policy_rt.enforcer.compiled.budgets == {"mistral-big": 0, "anthropic-30": 1}
        third = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], cgroup)
        other = run(lab, curl("https://api.openai.com/v1/models", o), cgroup)
        if per == "exe":  # another program of the same uid and cgroup: its own scope, not exhausted
            other = run(lab, curl("https://api.anthropic.com/v1/models", o), cgroup)
        evs += collect(mon, lambda e: any(isinstance(x, PolicyDecision) and x.enforced for x in e), timeout=10)
        snap = mon.budgets()
    assert first.stdout.split() == [b"200", b"20"] and second.stdout.split() == [b"200", b"20"], (
        first.stderr, second.stderr)
    assert third.returncode != 0 and (b"PermissionError" in third.stderr or b"Operation not permitted" in third.stderr)
    assert other.returncode == 0, other.stderr
    assert len(requests_with(lab, m)) == 2  # the server's own log: no third request
    assert len(requests_with(lab, o)) == (2 if per == "exe" else 1)
    calls = [e for e in evs if isinstance(e, LlmCall) and e.provider == "anthropic" and e.comm != "curl"]
    assert [c.total_tokens or (c.input_tokens + c.output_tokens) for c in calls] == [20, 20]
    spends = [e for e in evs if isinstance(e, BudgetSpend)]
    assert [(s.budget, s.scope, s.tokens) for s in spends] == [("anthropic-30", scope, 20), ("anthropic-30", scope, 40)]
    ex = [e for e in evs if isinstance(e, BudgetExceeded)]
    assert len(ex) == 1
    e = ex[0]
    assert (e.budget, e.per, e.scope, e.tokens, e.limit_tokens, e.action, e.enforced, e.provider) == (
        "anthropic-30", per, scope, 40, 30, "deny", True, "anthropic")
    assert e.window_end == window_of(e.wall_time, 86400)[1]
    refused = [d for d in evs if isinstance(d, PolicyDecision) and d.enforced]
    assert len(refused) == 1, refused
    d = refused[0]
    assert (d.rule, d.action, d.point, d.provider, d.uid, d.dport) == (
        "budget:anthropic-30", "deny", "connect", "anthropic", 0, 443)
    assert ("budget", "anthropic-30") in d.matched and d.exe == sys.executable
    assert [(s["budget"], s["scope"], s["tokens"], s["exceeded"]) for s in snap] == [("anthropic-30", scope, 40, True)]
    assert ours_attached() == ""


def test_budget_spent_before_a_restart_still_refuses(lab, cgroup, tmp_path):
    """Spend kept in the store (BudgetSpend events) is restored at start: an exhausted uid is refused
    on its first connection after the restart (before any LLM call of this run); openai is not."""
    from busted import BudgetSpend
    from busted.policy.budget_enforce import stored_spend
    from busted.policy.budgets import window_of
    from busted.sinks import Store

    now = time.time()
    start, end = window_of(now, 86400)
    if end - now < 120:
        time.sleep(end - now + 1)
        now = time.time()
        start, end = window_of(now, 86400)
    pol = Policy.from_dict({"default": "audit", "budgets": [
        {"name": "anthropic-30", "provider": "anthropic", "per": "uid", "limit_tokens": 30, "window": "1d",
         "action": "deny"}]})
    with Store(tmp_path / "s.db") as st:
        st.write(BudgetSpend(ts_ns=1, wall_time=now, budget="anthropic-30", per="uid", scope="0", window_start=start,
                             window_end=end, tokens=40, usd=0.0, calls=2, limit_tokens=30))
        st.flush()
        rows = stored_spend([st], pol)
    m = uuid.uuid4().hex
    with busted.Monitor(policy=pol, enforce=True, policy_scope="/" + cgroup.name, budget_spend=rows) as mon:
        refused = run(lab, curl("https://api.anthropic.com/v1/models", m), cgroup)
        other = run(lab, curl("https://api.openai.com/v1/models", m), cgroup)
        evs = collect(mon, lambda e: any(isinstance(x, PolicyDecision) and x.enforced for x in e), timeout=10)
    assert refused.returncode == 7 and other.returncode == 0, (refused.stderr, other.stderr)
    reqs = requests_with(lab, m)
    assert len(reqs) == 1 and "openai" in str(reqs) and "anthropic" not in str(reqs)  # the server's own log
    d = next(d for d in evs if isinstance(d, PolicyDecision) and d.enforced)
    assert (d.rule, d.comm, d.uid, d.provider) == ("budget:anthropic-30", "curl", 0, "anthropic")
