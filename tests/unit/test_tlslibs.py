"""Which files the plaintext uprobes go on: ELF symbol checks on tiny libraries built here with gcc,
and /proc scanning on a fake /proc tree (no root)."""

import os
import shutil
import subprocess

import needs

from busted.ebpf.tlslibs import exported_symbols, kind_of, scan_pid

needs.tool("gcc", module_level=True)  # builds the test libraries


def build(tmp_path, name, code):
    src = tmp_path / f"{name}.c"
    src.write_text(code)
    out = tmp_path / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return str(out)


def test_openssl_gnutls_and_importers(tmp_path):
    ssl = build(tmp_path, "libssl", "int SSL_write(void*s,const void*b,int n){return n;}\n"
                                    "int SSL_read_ex(void*s,void*b,unsigned long n,unsigned long*r){return 1;}\n"
                                    "int unrelated(void){return 0;}\n")
    gnutls = build(tmp_path, "libgnutls", "long gnutls_record_send(void*s,const void*d,unsigned long n){return n;}\n")
    importer = build(tmp_path, "libuser", "int SSL_write(void*,const void*,int);\n"
                                          "int call(void){return SSL_write(0,0,0);}\n")
    assert exported_symbols(ssl) == {"SSL_write", "SSL_read_ex"} and kind_of(ssl) == "openssl"
    assert exported_symbols(gnutls) == {"gnutls_record_send"} and kind_of(gnutls) == "gnutls"
    assert exported_symbols(importer) == frozenset() and kind_of(importer) is None  # uses it, defines none
    junk = tmp_path / "libssl.so.9"
    junk.write_bytes(b"\x7fELF" + os.urandom(200))
    assert kind_of(str(junk)) is None and kind_of(str(tmp_path / "missing.so")) is None


def test_scan_pid_reads_maps_and_exe(tmp_path):
    ssl = build(tmp_path, "libssl", "int SSL_read(void*s,void*b,int n){return n;}\n")
    other = build(tmp_path, "libother", "int f(void){return 0;}\n")
    proc = tmp_path / "proc" / "42"
    proc.mkdir(parents=True)
    ino = os.stat(ssl).st_ino
    (proc / "maps").write_text(
        f"7f0000000000-7f0000001000 r-xp 00000000 fd:01 {ino} {ssl}\n"
        f"7f0000002000-7f0000003000 r--p 00000000 fd:01 {ino} {ssl}\n"
        f"7f0000004000-7f0000005000 r-xp 00000000 fd:01 1 {other}\n"
        "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n")
    (proc / "map_files").mkdir()  # the kernel's links to each mapping: what is opened
    os.symlink(ssl, proc / "map_files" / "7f0000000000-7f0000001000")
    os.symlink(ssl, proc / "exe")  # an executable that exports OpenSSL (node-like)
    assert scan_pid(42, proc=str(tmp_path / "proc")) == {ssl: "openssl"}
    assert scan_pid(43, proc=str(tmp_path / "proc")) == {}  # gone: nothing, no error


def test_a_mapped_path_that_now_names_another_file_is_not_followed(tmp_path):
    """The maps line names /x/libssl.so.1 (inode A); the path now holds another file (inode B).
    Only the mapped inode counts: through the mapping's own link, or the path if it is still A."""
    from busted.ebpf.tlslibs import mapped_candidates, open_candidate

    code = "int SSL_read(void*s,void*b,int n){return n;}\n"
    a = build(tmp_path, "libssl", code)
    b = tmp_path / "libssl.so.1"
    shutil.copy(a, b)
    proc = tmp_path / "proc" / "7"
    proc.mkdir(parents=True)
    st = os.stat(a)
    mj, mn = os.major(st.st_dev), os.minor(st.st_dev)
    (proc / "maps").write_text(f"7f0000000000-7f0000001000 r-xp 00000000 {mj:x}:{mn:x} {st.st_ino} {b}\n")
    (proc / "root").symlink_to("/")
    cands, over = mapped_candidates(7, proc=str(tmp_path / "proc"))
    assert over == 0 and [(c.path, c.ino) for c in cands if not c.exe] == [(str(b), st.st_ino)]
    # no map_files link (as without CAP_SYS_ADMIN): the path leads to B, which is not what is mapped
    assert open_candidate(cands[0], proc=str(tmp_path / "proc")) is None
    (proc / "map_files").mkdir()
    os.symlink(a, proc / "map_files" / "7f0000000000-7f0000001000")
    fd = open_candidate(cands[0], proc=str(tmp_path / "proc"))
    assert fd is not None and os.fstat(fd).st_ino == st.st_ino
    os.close(fd)


def test_candidates_per_process_are_bounded_and_non_utf8_names_do_not_hide_a_process(tmp_path):
    from busted.ebpf.tlslibs import MAX_CANDIDATES_PER_PID, mapped_candidates

    proc = tmp_path / "proc" / "9"
    proc.mkdir(parents=True)
    lines = [f"7f00{i:08x}000-7f00{i:08x}fff r-xp 00000000 fd:01 {100 + i} /x/libssl.so.{i}"
             for i in range(MAX_CANDIDATES_PER_PID + 5)]
    (proc / "maps").write_bytes(b"7f0000000000-7f0000001000 r-xp 00000000 fd:01 7 /x/\xff\xfe.so\n"
                                + "\n".join(lines).encode() + b"\n")
    cands, over = mapped_candidates(9, proc=str(tmp_path / "proc"))
    assert len([c for c in cands if not c.exe]) == MAX_CANDIDATES_PER_PID and over == 5


def test_not_a_regular_file_or_too_big_is_never_read(tmp_path, monkeypatch):
    from busted.ebpf import tlslibs

    fifo = tmp_path / "libssl.so.3"
    os.mkfifo(fifo)
    assert tlslibs.open_path(str(fifo)) is None  # a FIFO would block a reader: not even opened
    lib = build(tmp_path, "libssl", "int SSL_read(void*s,void*b,int n){return n;}\n")
    assert kind_of(lib) == "openssl"
    monkeypatch.setattr(tlslibs, "MAX_FILE_BYTES", 100)
    assert kind_of(lib) is None


def test_negative_verdicts_are_cached_by_file_identity(tmp_path, monkeypatch):
    from busted.ebpf import tlslibs

    lib = build(tmp_path, "libnot", "int f(void){return 0;}\n")
    calls = []
    real = tlslibs._read_symbols
    monkeypatch.setattr(tlslibs, "_read_symbols", lambda f: calls.append(1) or real(f))
    for _ in range(5):
        assert kind_of(lib) is None
    assert len(calls) == 1


def test_symbol_offsets_are_kept_between_runs_under_the_trust_rules(tmp_path, monkeypatch):
    import os

    from busted.ebpf import tlslibs

    lib = "/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(lib):
        lib = shutil.which("openssl") or lib
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(tlslibs, "_disk", {})
    monkeypatch.setattr(tlslibs, "_disk_dirty", [False])
    monkeypatch.setattr(tlslibs, "_verdicts", {})
    first = tlslibs.symbol_offsets(lib)
    tlslibs.save_symbol_cache()
    saved = tmp_path / "c" / "tls-symbols.json"
    assert saved.exists()
    tlslibs._disk.clear()
    tlslibs._verdicts.clear()
    calls = []
    monkeypatch.setattr(tlslibs, "_read_symbols", lambda f: calls.append(f.name) or {})
    tlslibs.load_symbol_cache()
    assert first and tlslibs.symbol_offsets(lib) == first and calls == []  # from the file, no ELF parsing
    os.chmod(saved, 0o666)  # writable by others: not trusted, parsed again
    tlslibs._disk.clear()
    tlslibs._verdicts.clear()
    tlslibs.load_symbol_cache()
    tlslibs.symbol_offsets(lib)
    assert len(calls) == 1
