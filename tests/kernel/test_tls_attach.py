"""TLS plaintext uprobes are attached per file (device, inode), to files processes map, a bounded
number of them; close() detaches every one, also those made while it runs.

Real uprobes on libraries built here with gcc (exporting the four OpenSSL functions: 8 perf fds
per file), mapped by small C processes, some in mount namespaces of their own (`unshare -m`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

FAKE_SSL = """
int SSL_write(void *s, const void *b, int n) { return n; }
int SSL_read(void *s, void *b, int n) { return n; }
int SSL_write_ex(void *s, const void *b, unsigned long n, unsigned long *w) { return 1; }
int SSL_read_ex(void *s, void *b, unsigned long n, unsigned long *r) { return 1; }
"""

# Maps the library given (and connects to 127.0.0.1:PORT if given), says "ok", and lives until its
# stdin closes (at most 120 s).
MAPPER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    alarm(120);
    if (!dlopen(argv[1], RTLD_NOW)) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    if (argc > 2) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET; a.sin_port = htons(atoi(argv[2])); a.sin_addr.s_addr = htonl(0x7f000001);
        if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    }
    printf("ok\n"); fflush(stdout);
    char c; while (read(0, &c, 1) > 0) {}
    return 0;
}
"""

# An executable that exports OpenSSL's functions (as node does); says "ok", lives until stdin closes.
FAKE_NODE = FAKE_SSL + r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    alarm(120);
    printf("ok\n"); fflush(stdout);
    char c; while (read(0, &c, 1) > 0) {}
    return 0;
}
"""

HOOKS_PER_FILE = 8  # 4 functions, entry + return


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlsattach")
    (d / "fake.c").write_text(FAKE_SSL)
    (d / "mapper.c").write_text(MAPPER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "libssl.so.3"), str(d / "fake.c")], check=True)
    subprocess.run(["gcc", "-o", str(d / "mapper"), str(d / "mapper.c"), "-ldl"], check=True)
    (d / "node.c").write_text(FAKE_NODE)
    subprocess.run(["gcc", "-rdynamic", "-o", str(d / "node"), str(d / "node.c")], check=True)
    return d


@pytest.fixture
def program():
    from busted.ebpf.loader import FlowProgram
    from busted.ebpf.plan import choose_plan
    from busted.ebpf.probe import probe

    plan = choose_plan(probe(), {"plaintext": "uprobe", "lineage": "off"})
    prog = FlowProgram(plan)
    yield prog
    prog.close()


def perf_fds() -> int:
    """This process's attachments: perf events and BPF links."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in ("anon_inode:[perf_event]", "anon_inode:bpf_link"):
                n += 1
        except OSError:
            pass
    return n


def attached_inodes(prog) -> set[tuple[int, int]]:
    """The (device, inode) of every file with uprobes. (Code before the inode keys named files by
    path: the file such a path leads to is what it attached.)"""
    if hasattr(prog, "tls_inodes"):
        return set(prog.tls_inodes)
    out = set()
    for path in prog.tls_files:
        st = os.stat(path)
        out.add((st.st_dev, st.st_ino))
    return out


class Mappers:
    """Processes that each map one library; all ended (stdin closed, then killed) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str]) -> int:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        assert line == "ok\n", (line, p.stderr.read() if p.poll() is not None else "")
        return p.pid

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            p.stdout.close()
            p.stderr.close()


@pytest.fixture
def mappers():
    m = Mappers()
    yield m
    m.close()


def settle(scanner, timeout: float = 30.0) -> None:
    """Wait until the scanner's queue is empty and the perf fd count stayed put for 0.5 s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = perf_fds()
        if n != last or scanner._queue:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return
        time.sleep(0.05)


def test_one_attachment_set_per_inode_across_mount_namespaces(built, program, mappers, tmp_path):
    """Two processes in two mount namespaces map the same file under paths that exist only in
    their namespace: one set of uprobes (8 perf fds), not one per process."""
    from busted.ebpf.tlsscan import TlsScanner

    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(built / "libssl.so.3", shared / "libssl.so.3")
    base = perf_fds()
    scanner = TlsScanner(program)
    scanner.start()
    try:
        for view in ("view-a", "view-b"):
            (tmp_path / view).mkdir()
            pid = mappers.start(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 'mount --bind "$1" "$2" && exec "$3" "$2/libssl.so.3"', "sh",
                                 str(shared), str(tmp_path / view), str(built / "mapper")])
            scanner.saw(pid)
            settle(scanner)
        assert not os.path.exists(tmp_path / "view-a" / "libssl.so.3")  # only inside those namespaces
        st = os.stat(shared / "libssl.so.3")
        assert attached_inodes(program) == {(st.st_dev, st.st_ino)}
        assert perf_fds() - base == HOOKS_PER_FILE
    finally:
        scanner.stop()


def test_an_executable_is_probed_as_run_not_the_file_its_path_names_here(built, program, mappers, tmp_path):
    """A process in its own mount namespace runs X at /…/bin/node, where this namespace has Y (a
    bind mount over it in that namespace): X is what runs and is probed; Y, on disk and run by
    nobody, is never attached."""
    from busted.ebpf.tlsscan import TlsScanner

    (tmp_path / "bin").mkdir()
    (tmp_path / "theirs").mkdir()
    y, x = tmp_path / "bin" / "node", tmp_path / "theirs" / "node"
    shutil.copy(built / "node", y)
    shutil.copy(built / "node", x)
    pid = mappers.start(["unshare", "-m", "--propagation", "private", "sh", "-c",
                         'mount --bind "$1" "$2" && exec "$2"', "sh", str(x), str(y)])
    scanner = TlsScanner(program)
    scanner.start()
    try:
        scanner.saw(pid)
        settle(scanner)
        sx, sy = os.stat(x), os.stat(y)
        assert attached_inodes(program) == {(sx.st_dev, sx.st_ino)}
        assert (sy.st_dev, sy.st_ino) not in attached_inodes(program)
    finally:
        scanner.stop()


def test_a_replaced_library_is_probed_as_mapped_never_the_file_now_at_its_path(built, program, mappers,
                                                                                tmp_path):
    """A process maps A at P; P is then replaced by B (an upgrade), and C lies beside it: A, still
    mapped (maps says "(deleted)"), is probed; B and C, mapped by nobody, are not."""
    from busted.ebpf.tlsscan import TlsScanner

    lib = tmp_path / "lib"
    lib.mkdir()
    p = lib / "libssl.so.1"
    shutil.copy(built / "libssl.so.3", p)
    a = os.stat(p)
    pid = mappers.start([str(built / "mapper"), str(p)])
    shutil.copy(built / "libssl.so.3", lib / "new")
    os.rename(lib / "new", p)  # the path now names B, which nothing maps
    shutil.copy(built / "libssl.so.3", lib / "libssl.so.2")  # C: on disk, never mapped
    b, c = os.stat(p), os.stat(lib / "libssl.so.2")
    scanner = TlsScanner(program)
    scanner.start()
    try:
        scanner.saw(pid)
        settle(scanner)
        got = attached_inodes(program)
        assert (b.st_dev, b.st_ino) not in got and (c.st_dev, c.st_ino) not in got
        assert got == {(a.st_dev, a.st_ino)}
    finally:
        scanner.stop()


def test_fake_library_storm_is_bounded_counted_and_closes(built, mappers, tmp_path):
    """200 processes each map their own copy of a fake libssl: at most MAX_TLS_LIBRARIES files are
    probed, the rest are refused and counted as TLS_LIBRARY losses, and close() detaches all."""
    from busted.ebpf.loader import FlowProgram
    from busted.ebpf.plan import choose_plan
    from busted.ebpf.probe import probe
    from busted.ebpf.tlsscan import TlsScanner
    from busted.events import LossPlace

    n = 200
    copies = tmp_path / "copies"
    copies.mkdir()
    before = perf_fds()
    prog = FlowProgram(choose_plan(probe(), {"plaintext": "uprobe", "lineage": "off"}))
    base = perf_fds()  # the program's tracepoints
    bound = getattr(prog, "max_tls_libraries", 32)  # (code before the bound had no such attribute)
    assert 0 < bound < n
    scanner = TlsScanner(prog)
    scanner.start()
    try:
        for i in range(n):
            path = copies / f"libssl.so.{i}"
            shutil.copy(built / "libssl.so.3", path)
            scanner.saw(mappers.start([str(built / "mapper"), str(path)]))
        settle(scanner, timeout=60)
        grown = perf_fds() - base
        assert len(prog.tls_files) == bound and grown == bound * HOOKS_PER_FILE
        assert prog.losses()[LossPlace.TLS_LIBRARY.value] == n - bound
        scanner.saw(os.getpid())  # nothing new after the bound: counted once per file, not per look
    finally:
        scanner.stop()
        done = threading.Event()
        t = threading.Thread(target=lambda: (prog.close(), done.set()))
        t0 = time.monotonic()
        t.start()
        t.join(timeout=120)  # bounded: a hung detach fails the test instead of hanging it
        print(f"close() of {bound} files: {time.monotonic() - t0:.2f} s")
    assert done.is_set()
    assert perf_fds() == before


def test_no_attachment_outlives_close_started_during_an_attach(built, tmp_path, monkeypatch):
    """close() while the scanner thread is in the middle of attaching a file, and it goes on
    attaching others: every perf fd made is closed, none is made after close() began."""
    from busted.ebpf import bpfsys
    from busted.ebpf.loader import FlowProgram
    from busted.ebpf.plan import choose_plan
    from busted.ebpf.probe import probe

    files = []
    for i in range(6):
        f = tmp_path / f"libssl.so.{i}"
        shutil.copy(built / "libssl.so.3", f)
        files.append(str(f))
    base = perf_fds()
    program = FlowProgram(choose_plan(probe(), {"plaintext": "uprobe", "lineage": "off"}))
    in_attach = threading.Event()

    def slowed(real):
        def attach(*args, **kw):
            fd = real(*args, **kw)
            if not in_attach.is_set():
                in_attach.set()
                time.sleep(0.3)  # close() starts here, in the middle of one file's hooks
            return fd
        return attach

    for name in ("perf_attach_probe", "uprobe_multi_link"):  # a perf event or a BPF link per hook
        if hasattr(bpfsys, name):
            monkeypatch.setattr(bpfsys, name, slowed(getattr(bpfsys, name)))
    results: list[object] = []

    def attacher() -> None:
        for f in files:
            try:
                results.append(program.attach_tls_library(f, "openssl"))
            except Exception as exc:  # whatever a closed program says, the fds are what counts
                results.append(exc)

    t = threading.Thread(target=attacher)
    t.start()
    assert in_attach.wait(10)
    program.close()
    t.join(timeout=30)
    assert not t.is_alive()
    assert perf_fds() == base, results
    assert program.attach_tls_library(files[0], "openssl") is False
    assert perf_fds() == base


def test_monitor_reports_refused_libraries_as_losses(built, mappers, tmp_path, monkeypatch):
    """Through the Monitor: processes that map their own fake libssl and connect; past the bound
    (BUSTED_MAX_TLS_LIBRARIES) each file is an EventsLost(TLS_LIBRARY) in the stream and in stats()."""
    import socket

    import busted
    from busted.events import EventsLost

    monkeypatch.setenv("BUSTED_MAX_TLS_LIBRARIES", "4")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    lost = 0
    with busted.Monitor(preexisting=False) as mon:
        for i in range(8):
            path = tmp_path / f"libssl.so.{i}"
            shutil.copy(built / "libssl.so.3", path)
            mappers.start([str(built / "mapper"), str(path), str(port)])
        deadline = time.monotonic() + 20
        refused = 0
        while time.monotonic() < deadline:
            for ev in mon.events(timeout=0.2):
                if isinstance(ev, EventsLost) and ev.where.name == "TLS_LIBRARY":
                    lost += ev.count
            refused = mon.stats().lost.get("TLS_LIBRARY", 0)
            if refused >= 4 and lost == refused:
                break
        files = mon.stats().tls_libraries
    srv.close()
    assert len(files) <= 4
    assert refused >= 4 and lost == refused  # 8 files, at most 4 probed (system ones first)
