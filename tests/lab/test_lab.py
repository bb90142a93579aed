"""The network lab: real namespaces, lab DNS, TLS providers, byte-exact sink, clean teardown."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from busted.lab import demo_traffic
from busted.lab.traffic import CLIENT_NAMES

PROVIDERS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com",
             "x.openai.azure.com", "www.example-nonllm.test"]


def dig(lab, *args: str) -> str:
    r = subprocess.run(["dig", f"@{lab.dns_addr}", "+time=2", "+tries=2", *args],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return r.stdout


def answers(out: str) -> list[list[str]]:
    sec, rows = False, []
    for line in out.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            sec = True
        elif sec and not line.strip():
            break
        elif sec:
            rows.append(line.split())
    return rows


# ---------------------------------------------------------------------------------------- DNS
@pytest.mark.parametrize("proto", ["+notcp", "+tcp"])
def test_dns_a_aaaa_with_ttl(lab, proto):
    host = lab.hosts["api.openai.com"]
    a = answers(dig(lab, proto, "api.openai.com", "A"))
    assert a == [["api.openai.com.", "60", "IN", "A", host.ipv4]]
    aaaa = answers(dig(lab, proto, "API.OpenAI.com", "AAAA"))  # names are case-insensitive
    assert [r[3:] for r in aaaa] == [["AAAA", host.ipv6]] and aaaa[0][1] == "60"


def test_dns_cname_chain(lab):
    rows = answers(dig(lab, "x.openai.azure.com", "A"))
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("x.openai.azure.com.", "CNAME", "x.privatelink.openai.azure.com."),
        ("x.privatelink.openai.azure.com.", "CNAME", "lab-edge.trafficmanager.net."),
        ("lab-edge.trafficmanager.net.", "A", lab.hosts["x.openai.azure.com"].ipv4),
    ]
    rows6 = answers(dig(lab, "x.openai.azure.com", "AAAA"))
    assert rows6[-1][3:] == ["AAAA", lab.hosts["x.openai.azure.com"].ipv6]


def test_dns_nxdomain_and_nodata(lab):
    out = dig(lab, "no-such-host.example.invalid", "A")
    assert "status: NXDOMAIN" in out and not answers(out)
    out = dig(lab, "api.openai.com", "MX")  # known name, no such type: NODATA
    assert "status: NOERROR" in out and not answers(out)


def test_dns_over_ipv6(lab):
    r = subprocess.run(["dig", f"@{lab.dns_addr6}", "+time=2", "api.anthropic.com", "A"],
                       capture_output=True, text=True, timeout=15)
    assert [row[4] for row in answers(r.stdout)] == [lab.hosts["api.anthropic.com"].ipv4]


def test_getaddrinfo_in_client_ns(lab):
    r = lab.run_client(["getent", "ahosts", "x.openai.azure.com"], timeout=15)
    assert r.returncode == 0, r.stderr
    addrs = {line.split()[0] for line in r.stdout.decode().splitlines()}
    assert addrs == set(lab.hosts["x.openai.azure.com"].addresses)
    code = ("import socket, json, sys; print(json.dumps(sorted({a[4][0] for a in "
            "socket.getaddrinfo(sys.argv[1], 443, proto=socket.IPPROTO_TCP)})))")
    for name in PROVIDERS:
        r = lab.run_client(["/usr/bin/python3", "-c", code, name], timeout=15)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == sorted(lab.hosts[name].addresses)
    r = lab.run_client(["getent", "hosts", "nothing.example.invalid"], timeout=15)
    assert r.returncode == 2  # not found, through the lab DNS


# ---------------------------------------------------------------------------------------- HTTPS
@pytest.mark.parametrize("family", ["-4", "-6"])
@pytest.mark.parametrize("name", PROVIDERS)
def test_curl_each_provider_over_tls(lab, name, family):
    # no --resolve, no --cacert: lab DNS via resolv.conf, lab CA via CURL_CA_BUNDLE from lab.env()
    r = lab.run_client(["curl", "-sS", family, "-m", "10", "-w", "\n%{http_code} %{remote_ip}",
                        f"https://{name}/"], timeout=20)
    assert r.returncode == 0, r.stderr
    body, status = r.stdout.decode().rsplit("\n", 1)
    code, ip = status.split()
    host = lab.hosts[name]
    assert code == "200" and ip == (host.ipv4 if family == "-4" else host.ipv6)
    assert json.loads(body)["host"] == name


def test_provider_endpoints_and_keepalive(lab):
    chat, stream = '{"model":"gpt-4o","messages":[]}', '{"model":"gpt-4o","stream":true}'
    for version in ("--http2", "--http1.1"):
        base = ["curl", "-sS", "-v", "-m", "10", version, "-H", "Content-Type: application/json",
                "-w", "\n%{http_version}\n"]
        r = lab.run_client([*base, "-d", chat, f"https://api.openai.com/v1/chat/completions?v={version}",
                            "--next", *base, "-d", stream,
                            f"https://api.openai.com/v1/chat/completions?v={version}s"], timeout=20)
        assert r.returncode == 0, r.stderr
        assert b"Re-using existing connection" in r.stderr  # keep-alive / one h2 connection for both
        first, v1, rest = r.stdout.split(b"\n", 2)
        want = b"2" if version == "--http2" else b"1.1"
        assert v1 == want and rest.endswith(b"data: [DONE]\n\n\n" + want + b"\n")
        assert json.loads(first)["usage"]["prompt_tokens"] == len(chat) // 4  # the documented rule
        recs = [q for q in lab.http_requests() if q["path"].endswith(f"?v={version}")
                or q["path"].endswith(f"?v={version}s")]
        assert [q["http_version"] for q in recs] == [want.decode()] * 2 and recs[0]["conn"] == recs[1]["conn"]

    r = lab.run_client(["curl", "-sS", "-m", "10", "-H", "x-api-key: sk-lab-test",
                        "-d", '{"model":"claude","max_tokens":5}', "https://api.anthropic.com/v1/messages"])
    assert json.loads(r.stdout)["usage"]["output_tokens"] == 5
    r = lab.run_client(["curl", "-sS", "-m", "10", "-d", "{}",
                        "https://generativelanguage.googleapis.com/v1beta/models/gemini-pro:generateContent"])
    assert json.loads(r.stdout)["usageMetadata"]["totalTokenCount"] == 1 + 8
    gen = '{"model":"llama3","prompt":"hi"}'
    r = lab.run_client(["curl", "-sS", "-m", "10", "-d", gen, "http://ollama.lab.test:11434/api/generate"])
    *_, last = [json.loads(x) for x in r.stdout.splitlines()]  # NDJSON: Ollama streams by default
    assert last["done"] is True and last["prompt_eval_count"] == len(gen) // 4
    r = lab.run_client(["curl", "-sS", "-m", "10", "http://www.example-nonllm.test/plain"])
    assert json.loads(r.stdout)["path"] == "/plain"
    big = "x" * 300_000  # the server reads the whole body before answering
    r = lab.run_client(["curl", "-sS", "-m", "10", "--data-binary", "@-", "https://api.openai.com/upload"],
                       input=big.encode())
    assert json.loads(r.stdout)["received_bytes"] == len(big)
    seen = {(q["host"], q["path"]) for q in lab.http_requests()}
    assert ("api.anthropic.com", "/v1/messages") in seen


def test_bare_ip_in_provider_cidr(lab):
    r = lab.run_client(["curl", "-sS", "-m", "10", f"https://{lab.bare_ip}/"], timeout=15)
    assert r.returncode == 0, r.stderr
    r = lab.run_client(["curl", "-sS", "-m", "10", f"https://[{lab.bare_ip6}]/"], timeout=15)
    assert r.returncode == 0, r.stderr
    import ipaddress

    assert ipaddress.ip_address(lab.bare_ip) in ipaddress.ip_network(lab.bare_cidr)
    assert not any(ipaddress.ip_address(h.ipv4) in ipaddress.ip_network(lab.bare_cidr)
                   for h in lab.hosts.values())


def test_every_demo_client_completes(lab):
    results = demo_traffic(lab, rounds=1, timeout=15)
    assert [r.name for r in results] == list(CLIENT_NAMES)
    for r in results:
        assert r.ok, (r.name, r.returncode, r.stdout[-300:], r.stderr[-500:])
        assert r.pid and r.pid > 0
    by = {r.name: r for r in results}
    assert b"200 OK" in by["openssl-openai"].stdout and b"verify return:1" in by["openssl-openai"].stderr
    assert b"HTTP/1.1 200 OK" in by["gnutls-azure"].stdout
    assert by["python-gemini"].stdout.startswith(b"200 ")
    assert by["node-openai"].stdout.startswith(b"200 ")


def test_spawn_client_pid_is_the_client(lab):
    p = lab.spawn_client(["sleep", "5"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            comm = Path(f"/proc/{p.pid}/comm").read_text().strip()
            if comm == "sleep":
                break
            time.sleep(0.02)
        assert comm == "sleep"
        cli_ino = os.stat(f"/run/netns/{lab.client_ns}").st_ino
        assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == cli_ino
    finally:
        p.kill()
        p.wait(5)


# ---------------------------------------------------------------------------------------- reachability
@pytest.mark.parametrize("family", [4, 6])
def test_root_ns_reaches_servers(lab, family):
    ctx = ssl.create_default_context(cafile=str(lab.ca_path))
    host = lab.hosts["api.anthropic.com"]
    ip = host.ipv4 if family == 4 else host.ipv6
    with socket.create_connection((ip, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="api.anthropic.com") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n")
            data = b""
            for _ in range(100):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")


def test_client_cannot_leave_the_lab(lab):
    # no default route in the client netns: the host's gateway is unreachable from it
    r = lab.run_client(["curl", "-sS", "-m", "3", "http://192.0.2.1/"], timeout=10)
    assert r.returncode != 0
    r = lab.run_client(["ip", "route"], timeout=10)
    assert b"default" not in r.stdout


# ---------------------------------------------------------------------------------------- tcp sink
SINK_CLIENT = textwrap.dedent("""
    import socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"a" * n)
    s.shutdown(socket.SHUT_WR)
    got = b""
    for _ in range(100000):
        c = s.recv(65536)
        if not c:
            break
        got += c
    sys.stdout.write(str(len(got)) + " " + got[:20].decode())
""")


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_sink_returns_exactly_m_bytes(lab, family):
    n, m = 123_457, 98_765
    port = 7000 + family
    pid = lab.start_tcp_sink(port, reply_bytes=m)
    try:
        host = lab.hosts["api.openai.com"]
        addr = host.ipv4 if family == 4 else host.ipv6
        r = lab.run_client(["/usr/bin/python3", "-c", SINK_CLIENT, addr, str(port), str(n)], timeout=20)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == f"{m} 01234567890123456789"
        deadline = time.monotonic() + 5
        while not lab.sink_records(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        (rec,) = lab.sink_records(pid)
        assert (rec["received"], rec["sent"], rec["peer"]) == (n, m, lab.client_addr if family == 4
                                                               else lab.client_addr6)
    finally:
        lab.stop_tcp_sink(pid)


def test_add_server_ip(lab):
    host = lab.add_server_ip("api.mistral.ai")
    assert answers(dig(lab, "api.mistral.ai", "A"))[0][4] == host.ipv4
    r = lab.run_client(["curl", "-sS", "-m", "10", "https://api.mistral.ai/v1/chat/completions", "-d", "{}"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["total_tokens"] > 0


# ---------------------------------------------------------------------------------------- teardown
def _leftovers(names: list[str], pids: list[int], netns_inodes: tuple[int, ...] = ()) -> list[str]:
    """What still exists of a lab: its netns / veth / /etc/netns names, live pids, and any process
    (lab-made or not) still inside one of its namespaces (by the namespace's inode)."""
    out = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    link_names = {part.split(":")[1].strip().split("@")[0] for part in links.splitlines() if ":" in part}
    for n in names:
        if n in netns or n in link_names or Path(f"/etc/netns/{n}").exists():
            out.append(n)
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(f"pid {p}")
    if netns_inodes:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in pids:
                continue
            try:
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, not yet reaped: holds no namespace
                if os.stat(proc / "ns" / "net").st_ino in netns_inodes:
                    out.append(f"pid {proc.name} in a lab netns")
            except OSError:
                continue  # gone meanwhile, or a kernel thread
    return out


def test_teardown_leaves_nothing(need_root):
    from busted.lab import Lab

    lab = Lab()
    with lab:
        plan = lab.plan
        live_names = [plan.client_ns, plan.server_ns, plan.root_veth_srv, plan.root_veth_cli]
        # root_veth_direct only exists in the root netns while the lab is being built (then it is
        # renamed srv0 in the client netns); after teardown it must not be there either.
        names = [*live_names, plan.root_veth_direct]
        inodes = tuple(os.stat(f"/run/netns/{ns}").st_ino for ns in (plan.client_ns, plan.server_ns))
        sleeper = lab.spawn_client(["sleep", "30"])
        sink = lab.start_tcp_sink(7100, reply_bytes=1)
        pids = [*lab.server_pids, sleeper.pid, sink]
        tmpdir = lab.tmpdir
        assert Path(f"/etc/netns/{lab.client_ns}/resolv.conf").read_text().count(lab.dns_addr) == 1
        # the checker sees everything the running lab made (so an empty answer below means gone)
        assert _leftovers(names, pids) == [*live_names, *[f"pid {p}" for p in pids]]
        # a process the lab did not start, inside its server netns: teardown must kill it too
        stray = subprocess.Popen(["ip", "netns", "exec", plan.server_ns, "sh", "-c", "echo in; exec sleep 30"],
                                 stdout=subprocess.PIPE)
        try:
            assert stray.stdout.readline() == b"in\n"  # announced from inside the netns
            inside = _leftovers([], pids, inodes)  # the lab's own pids are listed by pid, not again
            assert inside[: len(pids)] == [f"pid {p}" for p in pids]
            assert f"pid {stray.pid} in a lab netns" in inside[len(pids):]
        except BaseException:
            stray.kill()
            stray.wait(5)
            raise
    try:
        assert _leftovers(names, pids, inodes) == []
        assert not tmpdir.exists() and not plan.state_file.exists()
    finally:
        stray.kill()
        stray.wait(5)
        stray.stdout.close()
    lab.close()  # idempotent


def test_crashed_lab_is_cleaned_by_the_next(need_root, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import json, os, signal
        from busted.lab import Lab
        lab = Lab().start()
        p = lab.plan
        print(json.dumps([[p.client_ns, p.server_ns, p.root_veth_srv, p.root_veth_cli], lab.server_pids]),
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    names, pids = json.loads(r.stdout)
    assert _leftovers(names, []) != []  # the crash left namespaces behind...
    from busted.lab import Lab

    with Lab() as lab2:  # ...which the next lab's start removes
        assert _leftovers(names, pids) == []
        assert lab2.run_client(["curl", "-sS", "-m", "5", "https://api.openai.com/"]).returncode == 0
