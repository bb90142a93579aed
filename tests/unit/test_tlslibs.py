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
    os.symlink(ssl, proc / "exe")  # an executable that exports OpenSSL (node-like)
    assert scan_pid(42, proc=str(tmp_path / "proc")) == {ssl: "openssl"}
    assert scan_pid(43, proc=str(tmp_path / "proc")) == {}  # gone: nothing, no error


def test_symbol_offsets_are_kept_between_runs_under_the_trust_rules(tmp_path, monkeypatch):
    import os

    from busted.ebpf import tlslibs

    lib = "/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(lib):
        lib = shutil.which("openssl") or lib
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(tlslibs, "_disk", {})
    monkeypatch.setattr(tlslibs, "_disk_dirty", [False])
    first = tlslibs.symbol_offsets(lib)
    tlslibs.save_symbol_cache()
    saved = tmp_path / "c" / "tls-symbols.json"
    assert saved.exists()
    tlslibs._disk.clear()
    calls = []
    monkeypatch.setattr(tlslibs, "_symbols_of", lambda fid, path: calls.append(path) or {})
    tlslibs.load_symbol_cache()
    assert tlslibs.symbol_offsets(lib) == first and calls == []  # from the file, no ELF parsing
    os.chmod(saved, 0o666)  # writable by others: not trusted, parsed again
    tlslibs._disk.clear()
    tlslibs.load_symbol_cache()
    tlslibs.symbol_offsets(lib)
    assert calls == [lib]
