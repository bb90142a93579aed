"""What the issue-11 benchmarks share: a monitor process to start and stop, a loopback workload that
runs while monitors come and go, and readings of a process's CPU and memory.

Everything goes through busted's public surface (``busted.Monitor`` in bench/busted_consumer.py, the
``busted`` command line), so the tools keep working while the pipeline's insides change.
Traffic is loopback only; every loop is bounded by a deadline.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(HERE))
from churn import ping, server  # noqa: E402 - the churn bench's server and connection

HELLO = bytes.fromhex((ROOT / "tests/unit/fixtures/hello_openssl.hex").read_text().strip())  # SNI api.openai.com


class Unsupported(Exception):
    """A configuration this busted does not offer (e.g. busy-host before it lands): skipped, said so."""


# -- readings of a process -------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of every thread of ``pid`` so far (/proc, 1/CLK_TCK resolution)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def children_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds so far of each live child of ``pid`` (``--ui``'s page process, for one)."""
    out: dict[int, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            kids = open(f"/proc/{pid}/task/{t}/children").read().split()
        except OSError:
            continue
        for k in kids:
            try:
                out[int(k)] = cpu_s(int(k))
            except OSError:
                pass
    return out


def mem_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) / 1024
    return out


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "busted"], capture_output=True,
                           text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _readline(stream: Any, timeout: float) -> str | None:
    """One line from a pipe, or None after ``timeout`` (a monitor that never gets ready must not hang us)."""
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


# -- a monitor process ------------------------------------------------------------------------------

CONSUMER_FLAGS = {"busted": [], "busted-noplaintext": ["--no-llm-calls"], "busted-noclassify": ["--no-classify"],
                  "busted-busyhost": ["--busy-host"], "busted-syscallcapture": ["--capture-syscall"]}
CLI_FLAGS = {"cli-json": [], "cli-jsonl": ["--jsonl", "{dir}/events.jsonl"],
             "cli-store": ["--store", "{dir}/busted.db"], "cli-busyhost": ["--busy-host"],
             "cli-ui": ["--ui", "127.0.0.1:0"], "cli-import": []}
# cli-import: `busted monitor --json` in a process that has imported the web page's modules
# (Starlette, uvicorn, busted.web.app) without serving: what loading them costs, apart from --ui
_IMPORT_UI = ("import sys, starlette.applications, uvicorn, busted.web.app; from busted.cli import main; "
              "sys.argv[0] = 'busted'; sys.exit(main())")


_EXE = Path(PY).parent / "busted"
BUSTED = [str(_EXE)] if _EXE.exists() else [PY, "-m", "busted.cli"]  # the installed command, as people run it


def cli_has(flag: str) -> bool:
    out = subprocess.run([*BUSTED, "monitor", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    return flag in out.stdout


@dataclass
class Tracer:
    """A monitor in its own process: ``busted*`` = bench/busted_consumer.py (a counting ``Monitor()``
    consumer), ``cli-*`` = ``busted monitor --json`` with stdout to /dev/null (+ a sink), ``tcplife`` =
    bcc's tcplife-bpfcc. ``start()`` returns once it says it is attached; ``stop()`` returns its
    summary and whole-process rusage (os.wait4)."""

    config: str
    extra: list[str] = field(default_factory=list)
    workdir: str = "/tmp"
    ready_timeout: float = 60.0
    proc: subprocess.Popen | None = None
    res: dict[str, Any] = field(default_factory=dict)
    _drain: Any = None

    def start(self) -> Tracer:
        c = self.config
        t = time.monotonic()
        if c.startswith("busted"):
            if c not in CONSUMER_FLAGS:
                raise ValueError(f"unknown config {c}")
            argv = [PY, str(HERE / "busted_consumer.py"), *CONSUMER_FLAGS[c], *self.extra]
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, cwd=ROOT)
            line = _readline(self.proc.stdout, self.ready_timeout) or ""
            if line.startswith("UNSUPPORTED"):
                self.proc.wait(30)
                raise Unsupported(line.split(" ", 1)[1].strip())
            if not line.startswith("READY"):
                self._abort(f"{c}: no READY line: {line!r}")
            _, spawn_s, start_s = line.split()
            self.res.update(startup_spawn_s=float(spawn_s), startup_monitor_s=float(start_s))
        elif c.startswith("cli-"):
            if c == "cli-busyhost" and not cli_has("--busy-host"):
                raise Unsupported("`busted monitor --busy-host` is not an option of this busted")
            flags = [x.format(dir=self.workdir) for x in CLI_FLAGS[c]]
            prefix = [PY, "-c", _IMPORT_UI] if c == "cli-import" else BUSTED
            argv = [*prefix, "monitor", "--json", *flags, *self.extra]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
            end = time.monotonic() + self.ready_timeout
            m = None
            while m is None and time.monotonic() < end:  # other lines may come first (--ui's URL)
                line = _readline(self.proc.stderr, max(0.1, end - time.monotonic())) or ""
                if u := re.search(r"web UI at (\S+)", line):
                    self.res["ui_url"] = u.group(1)
                m = re.search(r"probes attached in ([0-9.]+) s", line)
                if not line:
                    break
            if not m:
                self._abort(f"{c}: no ready line: {line!r}")
            self.res["startup_monitor_s"] = float(m.group(1))
        elif c == "tcplife":
            exe = shutil.which("tcplife-bpfcc") or "/usr/sbin/tcplife-bpfcc"
            if not os.path.exists(exe):
                raise Unsupported(f"{exe} not installed")
            self.proc = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if _readline(self.proc.stdout, self.ready_timeout) is None:  # its header: attached
                self._abort("tcplife: no header line")
            # its output must go somewhere, as cheaply as churn.py sends it: cat to /dev/null
            self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)
        else:
            raise ValueError(f"unknown config {c}")
        self.res["startup_wall_s"] = time.monotonic() - t
        self.res["cpu_at_ready_s"] = cpu_s(self.proc.pid)
        self._kids_at_ready = children_cpu_s(self.proc.pid)
        self.res.update({f"{k}_at_ready_mb": v for k, v in mem_mb(self.proc.pid).items()})
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        """A consumer started with ``extra=["--control"]``: its counters now."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("s\n")
        self.proc.stdin.flush()
        line = _readline(self.proc.stdout, 30) or ""
        if not line.startswith("STATS "):
            raise RuntimeError(f"{self.config}: no STATS answer: {line!r}")
        return json.loads(line[6:])

    def _abort(self, why: str) -> None:
        assert self.proc is not None
        self.proc.kill()
        _out, err = self.proc.communicate(timeout=30)
        raise RuntimeError(f"{why}\n{(err or '')[-2000:]}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM, read its last words, reap it with os.wait4 for its rusage."""
        p = self.proc
        assert p is not None
        self.res["cpu_at_stop_s"] = cpu_s(p.pid)
        # children alive from ready to stop (the page's process of --ui): their CPU in that window
        kids = children_cpu_s(p.pid)
        before = getattr(self, "_kids_at_ready", {})
        self.res["cpu_children_steady_s"] = sum(c - before[k] for k, c in kids.items() if k in before)
        self.res.update({f"{k}_at_stop_mb": v for k, v in mem_mb(p.pid).items()})
        p.send_signal(signal.SIGTERM)  # not SIGINT: a background job may have it ignored
        texts: dict[str, str] = {}

        def slurp(name: str, stream: Any) -> None:
            texts[name] = stream.read()

        readers = [threading.Thread(target=slurp, args=(n, s), daemon=True)
                   for n, s in (("out", p.stdout), ("err", p.stderr)) if s is not None and not
                   (self.config == "tcplife" and n == "out")]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 60
        while True:  # bounded: SIGKILL after 60 s
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                deadline = float("inf")
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        for r in readers:
            r.join(30)
        if self._drain is not None:
            self._drain.wait(30)
        self.res.update(rusage_cpu_s=ru.ru_utime + ru.ru_stime, maxrss_mb=ru.ru_maxrss / 1024,
                        exit_code=p.returncode)
        out, err = texts.get("out", ""), texts.get("err", "")
        if self.config.startswith("busted"):
            lines = [x for x in out.strip().splitlines() if x.startswith("{")]
            if not lines:
                raise RuntimeError(f"{self.config}: no summary; stderr: {err[-2000:]}")
            s = json.loads(lines[-1])
            self.res.update(events=s["events"], lost=max(s["lost_events"], s["lost_stats"]),
                            lost_by_place=s["lost_by_place"], startup_s=s["startup_s"])
        elif self.config.startswith("cli-"):
            m = re.search(r"kernel records (\d+), events (\d+)", err)
            if not m:
                raise RuntimeError(f"{self.config}: no summary on stderr: {err[-2000:]}")
            self.res["events"] = int(m.group(2))
            lm = re.search(r"^lost: (.*)$", err, re.M)
            lost = 0
            if lm and lm.group(1) != "none":
                lost = sum(int(kv.split("=")[1]) for kv in lm.group(1).split(", "))
            self.res["lost"] = lost
        self.res["cpu_steady_s"] = self.res["cpu_at_stop_s"] - self.res["cpu_at_ready_s"]
        return self.res


# -- a loopback workload that outlives monitors --------------------------------------------------------


def _client(port: int, rate: Any, procs: int, count: Any, stop: Any, stop_at: float, hello: bool,
            out: Any) -> None:
    """Connections until ``stop`` or ``stop_at``; ``rate`` (shared, conn/s in all; <= 0: as fast as
    possible) paces them. hello: send a TLS ClientHello and record (local port, ns before connect)."""
    next_t = time.monotonic()
    recs = []
    while not stop.is_set():
        now = time.monotonic()
        if now >= stop_at:
            break
        r = rate.value
        if r > 0:
            if next_t > now:
                time.sleep(min(next_t - now, 0.2))
                continue
            next_t = max(next_t + procs / r, now - 1.0)  # behind by > 1 s: do not burst to catch up
        if hello:
            s = socket.socket()
            s.settimeout(5)
            t0 = time.monotonic_ns()
            try:
                s.connect(("127.0.0.1", port))
                recs.append((s.getsockname()[1], t0))
                s.sendall(HELLO)
                s.recv(8)
                count.value += 1
            except OSError:
                pass
            finally:
                s.close()
        elif ping(port):
            count.value += 1
    out.put(recs)


class Workload:
    """churn.py's server and clients, kept running while tracers come and go; ``count()`` reads the
    completed connections so far (one shared counter per client: no lock on the hot path)."""

    def __init__(self, procs: int = 4, rate: float = 0.0, hello: bool = False, max_seconds: float = 600.0) -> None:
        self.procs, self.hello = procs, hello
        self.stop_at = time.monotonic() + max_seconds
        self.rate = mp.RawValue("d", rate)
        self._stop = mp.Event()
        self._out: mp.Queue = mp.Queue()
        q: mp.Queue = mp.Queue()
        self._srv = mp.Process(target=server, args=(q, self.stop_at + 5), daemon=True)
        self._srv.start()
        self.port: int = q.get(timeout=30)
        self._counts: list[Any] = []
        self._clients: list[mp.Process] = []

    def start_clients(self) -> Workload:
        for _ in range(self.procs):
            c = mp.RawValue("q", 0)
            p = mp.Process(target=_client, daemon=True, args=(self.port, self.rate, self.procs, c, self._stop,
                                                              self.stop_at, self.hello, self._out))
            p.start()
            self._counts.append(c)
            self._clients.append(p)
        return self

    def count(self) -> int:
        return sum(c.value for c in self._counts)

    def measure(self, seconds: float) -> float:
        """Connections per second over the next ``seconds``."""
        c0, t0 = self.count(), time.monotonic()
        time.sleep(seconds)
        return (self.count() - c0) / (time.monotonic() - t0)

    def stop(self) -> list[tuple[int, int]]:
        """Stop everything; the clients' (port, connect ns) records when ``hello``."""
        self._stop.set()
        recs: list[tuple[int, int]] = []
        for _ in self._clients:
            recs.extend(self._out.get(timeout=60))
        for p in self._clients:
            p.join(10)
        self._srv.terminate()
        self._srv.join(10)
        return recs

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self._stop.set()
            for p in [*self._clients, self._srv]:
                p.join(5)
                if p.is_alive():
                    p.kill()


class _CRate:
    """``Workload.rate``'s interface (``.value``) for the C load: a write sets the rate."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc, self._value = proc, 0.0

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, r: float) -> None:
        self._value = r
        self._proc.stdin.write(f"rate {r}\n")
        self._proc.stdin.flush()


class CWorkload:
    """``Workload`` with bench/churn.c's C threads instead of Python clients: the same connection,
    paced the same way, faster (the Python clients stop at ~12 k conn/s under a tracer here).
    Compiled with ``cc`` into a private temporary folder (a compiler is needed only for this)."""

    def __init__(self, procs: int = 4, rate: float = 0.0, max_seconds: float = 600.0) -> None:
        src = HERE / "churn.c"
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise Unsupported("--c-load needs a C compiler (cc)")
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="busted-churn-")
        exe = Path(self._dir.name) / "churn"
        subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
        self.procs = procs
        self._proc = subprocess.Popen([str(exe), str(procs), str(max_seconds)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        line = _readline(self._proc.stdout, 10) or ""
        if not line.startswith("PORT "):
            self._proc.kill()
            raise RuntimeError(f"bench/churn.c did not start: {line!r}")
        self.port = int(line.split()[1])
        self.rate = _CRate(self._proc)
        self.rate.value = rate

    def start_clients(self) -> CWorkload:
        return self  # the threads run from the start, at the rate given

    def count(self) -> int:
        self._proc.stdin.write("count\n")
        self._proc.stdin.flush()
        line = _readline(self._proc.stdout, 10) or ""
        return int(line.split()[1]) if line.startswith("COUNT ") else 0

    def stop(self) -> list[tuple[int, int]]:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()
        return []

    def __enter__(self) -> CWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
