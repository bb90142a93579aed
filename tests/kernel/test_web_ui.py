"""The web page in a real browser (Debian's Chromium, driven headless by Playwright), against the lab:
`busted monitor --ui` with real BPF and real clients, then `busted ui --store` as an unprivileged user.
Screenshots of every view are saved in the test's temporary directory."""

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import needs

BUSTED = [sys.executable, "-m", "busted.cli"]
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
URL = re.compile(rb"web UI at (http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]+))")
VIEWS = ("calls", "spend", "flows", "decisions", "mcp", "health")


def _browser():
    if not os.path.exists(CHROMIUM):
        needs.skip(f"{CHROMIUM} missing: Debian's chromium is not installed (./bootstrap.sh test installs it)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)


class Proc:
    """A busted command; stderr read (bounded) until a pattern shows."""

    def __init__(self, argv, **kw):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        self.err = b""

    def wait_for(self, pattern: re.Pattern, timeout: float = 90):
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.err) < 1_000_000:
            m = pattern.search(self.err)
            if m:
                return m
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                self.err += chunk
        raise AssertionError(f"no {pattern.pattern!r} in: {self.err.decode(errors='replace')[-3000:]}")

    def stop(self, timeout: float = 30):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


BODY = '{{"model":"{model}","max_tokens":{out},"messages":[{{"role":"user","content":"{text}"}}]}}'


def _call(lab, model: str, out: int, text: str, argv0: str = "curl") -> tuple[int, int]:
    body = BODY.format(model=model, out=out, text=text)
    r = lab.run_client([argv0, "-sS", "--fail", "-m", "10", "https://api.openai.com/v1/chat/completions",
                        "-H", "Content-Type: application/json", "-d", body])
    assert r.returncode == 0, r.stderr
    usage = json.loads(r.stdout)["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


# A client whose command name (comm, 15 bytes any content) is HTML, making one real call.
EVIL_CLIENT = """
import ctypes, json, urllib.request
ctypes.CDLL(None).prctl(15, b"<b id=pwn>", 0, 0, 0)  # PR_SET_NAME
body = json.dumps({"model": "gpt-4o", "max_tokens": 2, "messages": [{"role": "user", "content": "evil"}]})
req = urllib.request.Request("https://api.openai.com/v1/chat/completions", body.encode(),
                             {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read()[:40])
"""


def _rows(page, table: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"#{table} tbody tr",
                                     "trs => trs.map(tr => Array.from(tr.cells, c => c.textContent))")


def _wait_rows(page, table: str, pred, timeout: float = 20.0) -> list[list[str]]:
    end = time.monotonic() + timeout
    rows: list[list[str]] = []
    while time.monotonic() < end:
        rows = _rows(page, table)
        if pred(rows):
            return rows
        page.wait_for_timeout(250)
    raise AssertionError(f"#{table} never matched; rows: {rows}")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _listens_on(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def _has_call(rows, model: str, tin: int, tout: int) -> bool:
    # columns: time process agent provider model stream in out cache ttft duration status cost
    return any(r[3] == "openai" and r[4].startswith(model) and r[6] == f"{tin:,}" and r[7] == f"{tout:,}"
               for r in rows)


def test_live_page_in_chromium_then_the_store_as_nobody(lab, tmp_path):
    store = tmp_path / "audit.db"
    mon = Proc([*BUSTED, "monitor", "--json", "--ui", "127.0.0.1:0", "--store", str(store)])
    pw = browser = None
    try:
        m = mon.wait_for(URL)
        url, port = m.group(1).decode(), int(m.group(2))
        mon.wait_for(re.compile(rb"busted: monitoring"))
        base = f"http://127.0.0.1:{port}"
        # The token is the key: every route refuses without it; and only loopback listens.
        for path in ("/", "/api/stream", "/api/calls", "/static/app.js"):
            assert _status(base + path) == 401, path
        assert _listens_on(port) == {"127.0.0.1"}
        # The page is served by a child of the monitor that gave up root before serving.
        page_pid = _page_pid(mon.proc.pid)
        status = Path(f"/proc/{page_pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status

        first = [("gpt-4o", *_call(lab, "gpt-4o", 5, "hello")),
                 ("gpt-4o-mini", *_call(lab, "gpt-4o-mini", 9, "x" * 80))]
        pw, browser = _browser()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(url)
        assert "token=" not in page.url  # the token moved to an HttpOnly cookie
        rows = _wait_rows(page, "calls", lambda rs: all(_has_call(rs, *c) for c in first))
        page.screenshot(path=str(tmp_path / "ui-calls-1.png"))

        # A call made after the page opened appears without a reload.
        page.evaluate("window.__marker = 1")
        later = ("gpt-4.1", *_call(lab, "gpt-4.1", 3, "later"))
        rows = _wait_rows(page, "calls", lambda rs: _has_call(rs, *later))
        assert page.evaluate("window.__marker") == 1  # same document: no reload happened

        # A process named like HTML, and an SNI holding HTML: shown as text, never as markup.
        r = lab.run_client(["/usr/bin/python3", "-I", "-c", EVIL_CLIENT])
        assert r.returncode == 0, r.stderr
        rows = _wait_rows(page, "calls", lambda rs: any(r[1].startswith("<b id=pwn>") for r in rs))
        lab.run_client(["openssl", "s_client", "-connect", f"{lab.hosts['api.openai.com'].addresses[0]}:443",
                            "-servername", "<img id=sni src=x>", "-CAfile", str(lab.ca_path)],
                           input=b"", timeout=20)
        page.click("#tabs button[data-view=flows]")
        _wait_rows(page, "flows", lambda rs: any(r[3] == "<img id=sni src=x>" for r in rs), timeout=30)
        assert page.query_selector("#pwn") is None and page.query_selector("#sni") is None
        assert page.query_selector("img") is None
        for v in VIEWS:
            page.click(f"#tabs button[data-view={v}]")
            page.wait_for_timeout(600)
            page.screenshot(path=str(tmp_path / f"ui-{v}.png"))
        page.click("#tabs button[data-view=spend]")
        spend = _wait_rows(page, "spend", lambda rs: any(r[0] == "openai" for r in rs))
        assert int(next(r for r in spend if r[0] == "openai")[1].replace(",", "")) >= 4
        assert page.query_selector("#chart canvas") is not None  # uPlot drew (served locally, CSP allowed)
        page.click("#tabs button[data-view=health]")
        health = _wait_rows(page, "health", lambda rs: any(r[0] == "monitor events" for r in rs))
        assert dict((r[0], r[1]) for r in health)["open tabs"] == "1"
        assert not [e for e in errors if "Content Security Policy" in e], errors
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        mon.stop()
    assert mon.proc.returncode == 0, mon.err.decode(errors="replace")[-2000:]
    assert not Path(f"/proc/{page_pid}").exists(), "the page's process outlived the monitor"

    # The same calls from the store, served read-only by an unprivileged user.
    ro = Path(tempfile.mkdtemp(prefix="busted-ui-"))  # pytest's tmp_path is root's alone (0700)
    shutil.copy(store, ro / "audit.db")
    for p in (ro, ro / "audit.db"):
        os.chown(p, 65534, 65534)
    ui = Proc([*BUSTED, "ui", "--store", str(ro / "audit.db"), "--addr", "127.0.0.1:0", "--duration", "120"],
              user=65534, group=65534, extra_groups=[], cwd="/")
    pw = browser = None
    try:
        m = ui.wait_for(URL, 60)
        pw, browser = _browser()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(m.group(1).decode())
        rows = _wait_rows(page, "calls", lambda rs: all(_has_call(rs, *c) for c in [*first, later]))
        assert any(r[1].startswith("<b id=pwn>") for r in rows) and page.query_selector("#pwn") is None
        page.screenshot(path=str(tmp_path / "ui-store-calls.png"))
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        ui.stop()
        shutil.rmtree(ro, ignore_errors=True)
    shots = sorted(p.name for p in Path(tmp_path).glob("ui-*.png"))
    assert len(shots) == len(VIEWS) + 2, shots
    if os.environ.get("BUSTED_UI_SHOTS"):  # where a developer wants the screenshots kept
        for p in Path(tmp_path).glob("ui-*.png"):
            shutil.copy(p, os.environ["BUSTED_UI_SHOTS"])


def _page_pid(monitor_pid: int) -> int:
    """The page's own process: the monitor's child running busted.web.child."""
    for task in Path(f"/proc/{monitor_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if b"busted.web.child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    raise AssertionError(f"monitor {monitor_pid} has no page process")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class _Churn:
    """Loopback connections at about ``rate`` per second (connect, one byte, close) from a thread,
    for at most ``seconds``: the monitor's workload while the tab stays open. Each leaves a socket
    in TIME_WAIT for a minute, as churn does on a real host."""

    def __init__(self, rate: float, seconds: float) -> None:
        import socket
        import threading

        self.srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.rate, self.seconds, self.made = rate, seconds, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True),
                        threading.Thread(target=self._connect, daemon=True)]
        for t in self.threads:
            t.start()

    def _accept(self) -> None:
        self.srv.settimeout(0.5)
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            with c:  # read before closing: unread data would make close() send a RST (no TIME_WAIT)
                c.settimeout(2)
                with contextlib.suppress(OSError):
                    c.recv(1)

    def _connect(self) -> None:
        import socket

        start = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - start < self.seconds:
            due = start + self.made / self.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            with socket.create_connection(self.srv.getsockname(), timeout=2) as c:
                c.sendall(b"x")
            self.made += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.srv.close()


def test_a_tab_open_for_a_minute_keeps_the_monitor_flat(tmp_path):
    """Issue 24: a tab left open at 500 connections/s: the monitor and the page's process stay flat.
    The event stream is a flow that lives past
    the 30-s stale-flow sweep; the sweep used to dump every socket (the churn's ~30,000 TIME_WAIT
    ones among them) through pyroute2, and the monitor's RSS jumped by ~45 MB at the first sweep."""
    mon = Proc([*BUSTED, "monitor", "--json", "--ui", "127.0.0.1:0"])
    pw = browser = churn = None
    try:
        url = mon.wait_for(URL).group(1).decode()
        mon.wait_for(re.compile(rb"busted: monitoring"))
        churn = _Churn(rate=500, seconds=120)
        pw, browser = _browser()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        page.click("#tabs button[data-view=flows]")  # reloads its table every 3 s, plus the stream
        _wait_rows(page, "flows", lambda rs: len(rs) > 0, timeout=30)
        page.wait_for_timeout(10_000)  # the bounded windows fill (10,000 flow events)
        page_pid = _page_pid(mon.proc.pid)
        samples = [_rss_mb(mon.proc.pid)]
        page_samples = [_rss_mb(page_pid)]
        for _ in range(11):  # 55 s more: two sweeps pass while the stream is older than 30 s
            page.wait_for_timeout(5_000)
            samples.append(_rss_mb(mon.proc.pid))
            page_samples.append(_rss_mb(page_pid))
        page.click("#tabs button[data-view=health]")
        health = dict((r[0], r[1]) for r in _wait_rows(page, "health", lambda rs: any(r[0] == "open tabs" for r in rs)))
        assert health["open tabs"] == "1"
        assert churn.made > 10_000, f"the workload made only {churn.made} connections"
        tw = subprocess.run(["ss", "-Htn", "state", "time-wait"], capture_output=True, text=True).stdout
        assert tw.count("\n") > 5_000, "the churn left no TIME_WAIT sockets: it does not make the load it means to"
    finally:
        if churn is not None:
            churn.close()
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        mon.stop()
    assert mon.proc.returncode == 0, mon.err.decode(errors="replace")[-2000:]
    # flat: the windows are full after the first 10 s, so what is left is noise (a few MB)
    assert max(samples) - samples[0] < 15, samples
    assert max(page_samples) - page_samples[0] < 15, page_samples  # the page's process too
