"""The ``Lab``: two network namespaces, a DNS server and fake LLM providers, torn down on exit.

See ``docs/lab.md`` for the topology and address plan, and ``busted/lab/topology.py`` for how
namespaces are built and cleaned up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from busted._safe import CHILD_CWD, child_env, python_argv
from busted.errors import LabError, MissingDependency
from busted.lab import topology
from busted.lab.topology import Plan

if TYPE_CHECKING:
    from busted.lab.pki import LabCA, ServerCert

__all__ = ["Lab", "LabError", "LabHost"]

# (name, last octet of its IPv4 address in 10.231.N.0/24, kind). IPv6: fd6c:6162:R:100::<octet>.
PROVIDER_HOSTS: tuple[tuple[str, int, str], ...] = (
    ("api.openai.com", 65, "openai"),
    ("api.anthropic.com", 66, "anthropic"),
    ("generativelanguage.googleapis.com", 67, "gemini"),
    ("lab-edge.trafficmanager.net", 68, "azure-openai"),
    ("www.example-nonllm.test", 69, "nonllm"),
    ("ollama.lab.test", 70, "ollama"),
)
AZURE_NAME = "x.openai.azure.com"
AZURE_CHAIN = ("x.privatelink.openai.azure.com", "lab-edge.trafficmanager.net")
DNS_OCTET = 80
EXTRA_OCTETS = range(81, 110)  # for add_server_ip without an explicit address
BARE_OCTET = 113  # "bare IP in a provider CIDR": no DNS name; 10.231.N.112/28, fd6c:6162:R:100::110/124
OLLAMA_PORT = 11434
# An in-house OpenAI-compatible gateway: plain HTTP on a generic port, its name only in the client
# netns's /etc/hosts (no DNS record: DNS capture never sees it), and in no provider catalog.
GATEWAY_NAME = "llm-gw.lab.internal"
GATEWAY_OCTET = 71
GATEWAY_PORT = 8000
DNS_TTL = 60


@dataclass(frozen=True)
class LabHost:
    name: str
    ipv4: str
    ipv6: str
    kind: str  # openai | anthropic | gemini | azure-openai | nonllm | ollama | custom
    cname_chain: tuple[str, ...] = ()  # names between ``name`` and the one holding the A/AAAA

    @property
    def addresses(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    out: Path
    err: Path
    argv: list[str] = field(default_factory=list)

    def stderr_text(self, limit: int = 4000) -> str:
        try:
            return self.err.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_DONE = False
_PREV_SIGTERM: object = None


def _close_all() -> None:
    with _LIVE_LOCK:
        labs = [lab for lab in _LIVE if lab._owner_pid == os.getpid()]
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _on_sigterm(signum: int, frame: object) -> None:
    _close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _forget_labs_in_child() -> None:
    # A fork (pyroute2 forks helpers for netns work) must never tear down its parent's labs from
    # its atexit or SIGTERM handler: only the process that started a lab closes it.
    _LIVE.clear()


os.register_at_fork(after_in_child=_forget_labs_in_child)


def _pdeathsig() -> None:
    # Children die with the thread that started them, even if this process is SIGKILLed.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Lab:
    """Real network namespaces with a DNS server and TLS "LLM providers" in them.

    ``with Lab() as lab: lab.run_client(["curl", "-s", "https://api.openai.com/"])``

    Needs root to start (namespaces, veths, port 53/443); importing and constructing do not.
    """

    def __init__(
        self,
        prefix: str = "bl-",
        *,
        ready_timeout: float = 10.0,
        max_seconds: float = 3600.0,
        ttl: int = DNS_TTL,
    ) -> None:
        if not prefix or len(prefix) > 4 or "/" in prefix:
            raise LabError("prefix must be 1..4 characters (interface names are limited to 15)")
        self.prefix = prefix
        self.ready_timeout = ready_timeout
        self.max_seconds = max_seconds
        self.ttl = ttl
        self.plan: Plan | None = None
        self.hosts: dict[str, LabHost] = {}
        self.dns_addr = ""
        self.dns_addr6 = ""
        self.bare_ip = ""
        self.bare_ip6 = ""
        self.gateway: LabHost | None = None  # GATEWAY_NAME: plain HTTP on GATEWAY_PORT, /etc/hosts only
        self.bare_cidr = ""
        self.bare_cidr6 = ""
        self.tmpdir: Path | None = None
        self._ca: LabCA | None = None  # made in the lab's netns setup (needs cryptography: imported there)
        self._cert: ServerCert | None = None
        self._dns: _Child | None = None
        self._http: _Child | None = None
        self._sinks: dict[int, _Child] = {}
        self._clients: list[subprocess.Popen] = []
        self._records: dict[str, dict] = {}
        self._extra_tls: list[str] = []
        self._closed = False
        self._started = False
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ names and addresses
    @property
    def client_ns(self) -> str:
        return self._need_plan().client_ns

    @property
    def server_ns(self) -> str:
        return self._need_plan().server_ns

    @property
    def ca_path(self) -> Path:
        if self._ca is None:
            raise LabError("the lab is not started")
        return self._ca.ca_path

    @property
    def v4_net(self) -> str:
        return self._need_plan().v4_net

    @property
    def v6_net(self) -> str:
        return self._need_plan().v6_net

    @property
    def root_addr(self) -> str:
        """The root netns' address on its link to the servers netns."""
        return self._need_plan().v4(1)

    @property
    def client_addr(self) -> str:
        """The client netns' source address towards the providers (its end of the direct link)."""
        return self._need_plan().v4(9)

    @property
    def client_addr6(self) -> str:
        return self._need_plan().v6(2, "1")

    def _need_plan(self) -> Plan:
        if self.plan is None:
            raise LabError("the lab is not started")
        return self.plan

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Lab:
        if self._started:
            raise LabError("a Lab can be started once; make a new one")
        if os.geteuid() != 0:
            raise LabError("the network lab needs root (network namespaces, veths, ports 53/443): run it with sudo")
        if importlib.util.find_spec("cryptography") is None:  # the lab CA; checked before building anything
            raise MissingDependency("cryptography", "lab", "the network lab (its TLS certificates)")
        self._started = True
        self._owner_pid = os.getpid()
        self._register()
        try:
            self._build()
            self._start_servers()
        except BaseException:
            self.close()
            raise
        return self

    def _register(self) -> None:
        global _ATEXIT_DONE, _PREV_SIGTERM
        with _LIVE_LOCK:
            _LIVE.add(self)
            if not _ATEXIT_DONE:
                atexit.register(_close_all)
                _ATEXIT_DONE = True
            if threading.current_thread() is threading.main_thread():
                with contextlib.suppress(ValueError):
                    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                        _PREV_SIGTERM = signal.signal(signal.SIGTERM, _on_sigterm)

    def _unregister(self) -> None:
        global _PREV_SIGTERM
        with _LIVE_LOCK:
            _LIVE.discard(self)
            main = threading.current_thread() is threading.main_thread()
            if not _LIVE and _PREV_SIGTERM is not None and main:
                with contextlib.suppress(ValueError):
                    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                        signal.signal(signal.SIGTERM, _PREV_SIGTERM)  # type: ignore[arg-type]
                _PREV_SIGTERM = None

    def _build(self) -> None:
        from pyroute2 import IPRoute

        topology.STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(topology.STATE_DIR / ".lock", "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)  # one lab at a time chooses addresses and builds
            try:
                topology.cleanup_stale(self.prefix)
                with IPRoute() as ipr:
                    v4_net, v6_net = topology.choose_networks(self.prefix, ipr)
                names = {p.server_ns for p in topology.read_states(self.prefix)}
                for _ in range(100):
                    lab_id = os.urandom(3).hex()
                    if f"{self.prefix}srv-{lab_id}" not in names:
                        break
                self.tmpdir = Path(tempfile.mkdtemp(prefix="busted-lab-"))
                os.chmod(self.tmpdir, 0o755)
                plan = Plan(prefix=self.prefix, lab_id=lab_id, v4_net=v4_net, v6_net=v6_net,
                            owner_pid=os.getpid(), owner_start=topology.proc_start_time(os.getpid()),
                            tmpdir=str(self.tmpdir))
                plan.save()  # before creating anything, so a crash leaves a trail to clean up
                self.plan = plan
                topology.build(plan)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
        plan = self.plan
        for name, octet, kind in PROVIDER_HOSTS:
            self.hosts[name] = LabHost(name, plan.host_v4(octet), plan.host_v6(octet), kind)
            self._records[name + "."] = {"A": [plan.host_v4(octet)], "AAAA": [plan.host_v6(octet)]}
        edge = self.hosts[AZURE_CHAIN[-1]]
        self.hosts[AZURE_NAME] = LabHost(AZURE_NAME, edge.ipv4, edge.ipv6, "azure-openai", AZURE_CHAIN)
        chain = (AZURE_NAME, *AZURE_CHAIN)
        for a, b in zip(chain, chain[1:], strict=False):
            self._records[a + "."] = {"CNAME": b + "."}
        self.dns_addr, self.dns_addr6 = plan.host_v4(DNS_OCTET), plan.host_v6(DNS_OCTET)
        self.bare_ip, self.bare_ip6 = plan.host_v4(BARE_OCTET), plan.host_v6(BARE_OCTET)
        self.bare_cidr = str(ipaddress.ip_network(f"{self.bare_ip}/28", strict=False))
        self.bare_cidr6 = str(ipaddress.ip_network(f"{self.bare_ip6}/124", strict=False))
        self.gateway = LabHost(GATEWAY_NAME, plan.host_v4(GATEWAY_OCTET), plan.host_v6(GATEWAY_OCTET), "gateway")
        addrs = [(h.ipv4, h.ipv6) for n, h in self.hosts.items() if n != AZURE_NAME]
        addrs += [(self.dns_addr, self.dns_addr6), (self.bare_ip, self.bare_ip6), self.gateway.addresses]
        for v4, v6 in addrs:
            topology.add_server_address(plan, v4, v6)
        # Files that `ip netns exec <client>` bind-mounts over /etc: lab DNS, and one host entry: the
        # gateway, a name DNS capture never sees.
        etc = topology.NETNS_ETC / plan.client_ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"# busted lab {plan.lab_id}\nnameserver {self.dns_addr}\nnameserver {self.dns_addr6}\n"
            "options timeout:1 attempts:2\n"
        )
        (etc / "nsswitch.conf").write_text("hosts: files dns\nnetworks: files\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                                   f"{self.gateway.ipv4} {GATEWAY_NAME}\n")
        from busted.lab.pki import LabCA

        self._ca = LabCA(self.tmpdir / "pki")

    # ------------------------------------------------------------------ servers
    def _python_cmd(self, ns: str, module: str, *args: str) -> list[str]:
        # Isolated (-I, -u for the READY line; cwd / and a scrubbed env in _spawn): these run as root,
        # and `python -m` from the caller's directory would import another user's json.py.
        return ["ip", "netns", "exec", ns, *python_argv(module, *args, unbuffered=True)]

    def _spawn(self, name: str, argv: list[str]) -> _Child:
        assert self.tmpdir is not None and self.plan is not None
        out = self.tmpdir / f"{name}.out"
        err = self.tmpdir / f"{name}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=child_env(),
                                    cwd=CHILD_CWD, preexec_fn=_pdeathsig, start_new_session=True)
        self.plan.children.append(proc.pid)
        self.plan.save()
        return _Child(name, proc, out, err, argv)

    def _wait_ready_line(self, child: _Child, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if child.out.read_bytes().startswith(b"READY"):
                    return
            if child.proc.poll() is not None:
                raise LabError(f"lab {child.name} server exited with {child.proc.returncode} before ready; "
                               f"stderr:\n{child.stderr_text()}")
            time.sleep(0.02)
        raise LabError(f"lab {child.name} server not ready in {self.ready_timeout}s; "
                       f"stderr:\n{child.stderr_text()}")

    def _tls_listeners(self) -> list[str]:
        ips = [a for n, h in self.hosts.items() if n != AZURE_NAME for a in h.addresses]
        return list(dict.fromkeys(ips + [self.bare_ip, self.bare_ip6] + self._extra_tls))

    def _start_servers(self) -> None:
        assert self.tmpdir is not None
        deadline = time.monotonic() + self.ready_timeout
        dns_cfg = self.tmpdir / "dns.json"
        self._write_dns_config()
        self._dns = dns = self._spawn("dns", self._python_cmd(self.server_ns, "busted.lab.dns_server",
                                                              "--config", str(dns_cfg)))
        http = self._start_http()
        self._wait_ready_line(dns, deadline)
        self._wait_ready_line(http, deadline)
        self._wait_dns(deadline)
        self._wait_tls(deadline)

    def _write_dns_config(self) -> None:
        assert self.tmpdir is not None
        cfg = {
            "listen": [[self.dns_addr, 53], [self.dns_addr6, 53]],
            "ttl": self.ttl,
            "max_seconds": self.max_seconds,
            "records": self._records,
        }
        tmp = self.tmpdir / "dns.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=1))
        os.replace(tmp, self.tmpdir / "dns.json")

    def _start_http(self) -> _Child:
        assert self.tmpdir is not None and self._ca is not None
        names = [n for n in self.hosts] + list(AZURE_CHAIN)
        self._cert = cert = self._ca.issue_server(names, self._tls_listeners())
        ollama = self.hosts["ollama.lab.test"]
        cfg: dict[str, Any] = {
            "cert": str(cert.cert_path),
            "key": str(cert.key_path),
            "max_seconds": self.max_seconds,
            "tls": [[ip, 443] for ip in self._tls_listeners()],
            "plain": [[ip, 80] for ip in self._tls_listeners()],
            "ollama": [[ollama.ipv4, OLLAMA_PORT], [ollama.ipv6, OLLAMA_PORT]],
        }
        if self.gateway is not None:
            cfg["plain"] += [[a, GATEWAY_PORT] for a in self.gateway.addresses]
        path = self.tmpdir / "http.json"
        path.write_text(json.dumps(cfg, indent=1))
        self._http = http = self._spawn("http", self._python_cmd(self.server_ns, "busted.lab.http_server",
                                                                 "--config", str(path)))
        return http

    def _wait_dns(self, deadline: float, name: str = "api.openai.com", want: str | None = None) -> None:
        import dns.message
        import dns.query
        import dns.rdatatype

        want = want or self.hosts["api.openai.com"].ipv4
        last: object = None
        while time.monotonic() < deadline:
            try:
                q = dns.message.make_query(name, dns.rdatatype.A)
                r = dns.query.udp(q, self.dns_addr, timeout=0.5)
                if any(want in rr.to_text() for rr in r.answer):
                    dns.query.tcp(q, self.dns_addr, timeout=1.0)
                    return
                last = r.to_text()
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
            if self._dns and self._dns.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(f"lab DNS at {self.dns_addr} did not answer {name} ({last!r}); "
                       f"stderr:\n{self._dns.stderr_text() if self._dns else ''}")

    def _wait_tls(self, deadline: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        pending = list(self._tls_listeners())
        last: object = None
        while pending and time.monotonic() < deadline:
            ip = pending[0]
            try:
                fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
                with socket.socket(fam, socket.SOCK_STREAM) as raw:
                    raw.settimeout(1.0)
                    raw.connect((ip, 443))
                    with ctx.wrap_socket(raw, server_hostname=ip):
                        pass
                pending.pop(0)
                continue
            except (OSError, ssl.SSLError) as exc:
                last = exc
            if self._http and self._http.proc.poll() is not None:
                break
            time.sleep(0.05)
        if pending:
            raise LabError(f"lab TLS servers not accepting on {pending} ({last!r}); "
                           f"stderr:\n{self._http.stderr_text() if self._http else ''}")

    # ------------------------------------------------------------------ clients
    def env(self) -> dict[str, str]:
        """Environment variables that make common TLS clients trust the lab CA."""
        ca = str(self.ca_path)
        names = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
        return dict.fromkeys(names, ca)

    def client_cmd(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` prefixed to run in the client netns with the CA variables (and *env*) set.

        ``ip netns exec`` and ``env`` both exec, so the pid of the started process is the client's.
        """
        extra = dict(self.env(), **(env or {}))
        return ["ip", "netns", "exec", self.client_ns, "env", *[f"{k}={v}" for k, v in extra.items()],
                *argv]

    def server_cmd(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run in the servers netns."""
        return ["ip", "netns", "exec", self.server_ns, *argv]

    def run_client(self, argv: list[str], timeout: float = 30.0, *, input: bytes | None = None,  # noqa: A002
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run *argv* in the client netns to completion (from ``/``); stdout/stderr captured as bytes."""
        return subprocess.run(self.client_cmd(argv, env), input=input, capture_output=True, cwd=CHILD_CWD,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)

    def spawn_client(self, argv: list[str], env: dict[str, str] | None = None,
                     **popen_kwargs: object) -> subprocess.Popen:
        """Start *argv* in the client netns; ``.pid`` is the client process itself.

        Defaults: stdin from /dev/null, stdout and stderr piped, working directory ``/`` (a ``python -c``
        client, as root, must not import from the caller's directory). Killed at ``close()`` if still alive.
        """
        popen_kwargs.setdefault("cwd", CHILD_CWD)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self.client_cmd(argv, env), **popen_kwargs)  # type: ignore[call-overload]
        with self._lock:
            self._clients = [p for p in self._clients if p.poll() is None]
            self._clients.append(proc)
        return proc

    # ------------------------------------------------------------------ extras
    def start_tcp_sink(self, port: int, reply_bytes: int = 0, *, idle: float = 10.0,
                       max_seconds: float | None = None, max_conns: int = 10_000) -> int:
        """Start a byte-exact sink on ``[::]:port`` in the servers netns; return its pid.

        Per connection it reads until the client's FIN (``shutdown(SHUT_WR)``), then sends exactly
        ``reply_bytes`` bytes (``b"0123456789"`` repeated) and closes. ``sink_records(pid)`` lists
        what each connection received and was sent.
        """
        if not 0 < port < 65536 or port in (53, 80, 443, OLLAMA_PORT, GATEWAY_PORT):
            raise LabError(f"port {port} is not free for a sink")
        with self._lock:
            child = self._spawn(f"sink-{port}", self._python_cmd(
                self.server_ns, "busted.lab.tcp_sink", "--port", str(port), "--reply-bytes", str(reply_bytes),
                "--idle", str(idle), "--max-seconds", str(max_seconds or self.max_seconds),
                "--max-conns", str(max_conns)))
            self._wait_ready_line(child, time.monotonic() + self.ready_timeout)
            self._sinks[child.proc.pid] = child
        return child.proc.pid

    def sink_records(self, pid: int) -> list[dict]:
        """One dict per finished sink connection: peer, port, received, sent (and error)."""
        return _json_lines(self._sinks[pid].out)

    def stop_tcp_sink(self, pid: int) -> None:
        child = self._sinks.get(pid)
        if child is not None:
            _stop(child.proc)

    def dns_queries(self) -> list[dict]:
        """Queries the lab DNS answered so far (one dict per query)."""
        return _json_lines(self._dns.out) if self._dns else []

    def http_requests(self) -> list[dict]:
        """Requests the provider servers answered so far (one dict per request)."""
        return _json_lines(self._http.out) if self._http else []

    @property
    def server_pids(self) -> list[int]:
        kids = [self._dns, self._http, *self._sinks.values()]
        return [c.proc.pid for c in kids if c is not None]

    def add_server_ip(self, name: str, ip: str | None = None, ip6: str | None = None) -> LabHost:
        """Serve one more provider name: address in the servers netns, DNS A/AAAA, HTTPS/HTTP on it.

        Without *ip*/*ip6*, the next free address of the hosts block is used. Restarts the HTTP
        server (new certificate with the new SANs); takes well under a second.
        """
        plan = self._need_plan()
        with self._lock:
            used = {a for h in self.hosts.values() for a in h.addresses} | set(self._extra_tls)
            if ip is None or ip6 is None:
                octet = next((o for o in EXTRA_OCTETS if plan.host_v4(o) not in used), None)
                if octet is None:
                    raise LabError("no free address left in the lab hosts block")
                ip = ip or plan.host_v4(octet)
                ip6 = ip6 or plan.host_v6(octet)
            if ip not in used:
                topology.add_server_address(plan, ip, None)
            if ip6 not in used:
                topology.add_server_address(plan, None, ip6)
            host = LabHost(name, ip, ip6, "custom")
            self.hosts[name] = host
            self._records[name.rstrip(".") + "."] = {"A": [ip], "AAAA": [ip6]}
            self._extra_tls += [a for a in (ip, ip6) if a not in self._extra_tls]
            self._write_dns_config()
            assert self._dns is not None and self._http is not None
            self._dns.proc.send_signal(signal.SIGHUP)
            _stop(self._http.proc)
            http = self._start_http()
            deadline = time.monotonic() + self.ready_timeout
            self._wait_ready_line(http, deadline)
            self._wait_dns(deadline, name=name, want=ip)
            self._wait_tls(deadline)
        return host

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill every process of the lab and delete its namespaces, veths and files. Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked copy: the namespaces belong to the parent
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        for p in self._clients:
            with contextlib.suppress(Exception):
                _stop(p)
        for child in [self._http, self._dns, *self._sinks.values()]:
            if child is not None:
                with contextlib.suppress(Exception):
                    _stop(child.proc)
        if self.plan is not None:
            errors = topology.destroy(self.plan)
        elif self.tmpdir is not None:
            import shutil

            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._unregister()
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.plan else "new")
        nets = f" {self.plan.v4_net} {self.plan.v6_net}" if self.plan else ""
        return f"<Lab {self.prefix} {state}{nets}>"


def _stop(proc: subprocess.Popen, grace: float = 2.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def _json_lines(path: Path) -> list[dict]:
    out: list[dict] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out
