"""The bytecode cache and relocation, without the kernel."""

import os
import struct

import pytest

from busted.ebpf import bytecode
from busted.ebpf.bytecode import Compiled, MapSpec, relocate


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def test_relocate_rewrites_only_map_fd_loads():
    prog = (insn(0xB7, 1, imm=7)                     # mov r1, 7
            + insn(0x18, 1, src=1, imm=5) + insn(0)  # ld_imm64 r1, map fd 5
            + insn(0x18, 2, src=0, imm=5) + insn(0)  # ld_imm64 r2, constant 5: not a map
            + insn(0x18, 3, src=1, imm=9) + insn(0)  # ld_imm64 r3, map fd 9
            + insn(0x95))                            # exit
    out = relocate(prog, {5: 40, 9: 41})
    words = [struct.unpack_from("<BBhi", out, i) for i in range(0, len(out), 8)]
    assert words[0][3] == 7
    assert words[1][3] == 40 and words[3][3] == 5 and words[5][3] == 41
    assert len(out) == len(prog) and out[-8:] == prog[-8:]


def test_relocate_refuses_an_unknown_map():
    with pytest.raises(ValueError, match="unknown map fd 3"):
        relocate(insn(0x18, 1, src=1, imm=3) + insn(0), {5: 40})


def compiled() -> Compiled:
    return Compiled(maps=[MapSpec("events", 27, 0, 0, 1 << 16, 0, 3, "", "")],
                    funcs={"f": insn(0xB7) + insn(0x95)}, license="GPL", kern_version=0)


def test_cache_round_trip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(tmp_path / "c"))
    calls = []

    def fake_compile(source, timeout=300.0):
        calls.append(source)
        return compiled()

    monkeypatch.setattr(bytecode, "compile_source", fake_compile)
    a = bytecode.get_compiled("int x;")
    b = bytecode.get_compiled("int x;")
    c = bytecode.get_compiled("int y;")
    assert calls == ["int x;", "int y;"]  # the second start is a cache hit
    assert (a.source, b.source, c.source) == ("compile", "cache", "compile")
    assert b.funcs == a.funcs and b.maps == a.maps
    assert oct(os.stat(tmp_path / "c").st_mode & 0o777) == "0o700"
    assert bytecode.cache_key("int x;") != bytecode.cache_key("int y;")


def test_a_cache_others_can_write_is_not_trusted(tmp_path, monkeypatch):
    d = tmp_path / "c"
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(d))
    calls = []
    monkeypatch.setattr(bytecode, "compile_source", lambda s, timeout=300.0: calls.append(s) or compiled())
    bytecode.get_compiled("int x;")
    path = d / (bytecode.cache_key("int x;") + ".json")
    os.chmod(path, 0o666)  # anyone could have replaced the code the kernel would run
    assert bytecode.get_compiled("int x;").source == "compile"
    os.chmod(path, 0o600)
    os.chmod(d, 0o777)
    assert bytecode.get_compiled("int x;").source == "compile"
    assert len(calls) == 3


def test_a_corrupt_cache_file_is_recompiled(tmp_path, monkeypatch):
    d = tmp_path / "c"
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(d))
    monkeypatch.setattr(bytecode, "compile_source", lambda s, timeout=300.0: compiled())
    bytecode.get_compiled("int x;")
    (d / (bytecode.cache_key("int x;") + ".json")).write_text("{not json")
    assert bytecode.get_compiled("int x;").source == "compile"


def test_cache_off(monkeypatch):
    monkeypatch.setenv("BUSTED_BPF_CACHE", "off")
    assert bytecode.cache_dir() is None


def test_the_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(bytecode, "MAX_CACHED", 3)
    monkeypatch.setattr(bytecode, "compile_source", lambda s, timeout=300.0: compiled())
    for i in range(6):
        bytecode.get_compiled(f"int x{i};")
    assert len(list((tmp_path / "c").glob("*.json"))) == 3
