"""``python -m busted.ebpf.compile``: compile BPF C text (stdin) with BCC; print the bytecode as JSON.

Run as a short-lived child by ``bytecode.compile_source`` so LLVM never maps into the monitor.
The maps BCC creates while compiling belong to this process and die with it; what the parent
needs is each map's definition, the fd number BCC wrote into the instructions that use it, and
each function's instructions. The last stdout line is ``{"compiled": ...}`` or ``{"error": kind,
"message": ...}``.
"""

from __future__ import annotations

import ctypes
import json
import sys


def _compile(source: bytes) -> dict:
    import bcc
    from bcc import libbcc

    lib = libbcc.lib
    for fn, res, args in (("bpf_num_tables", ctypes.c_ulonglong, [ctypes.c_void_p]),
                          ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_ulonglong]),
                          ("bpf_table_fd_id", ctypes.c_int, [ctypes.c_void_p, ctypes.c_ulonglong]),
                          ("bpf_table_key_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_ulonglong]),
                          ("bpf_table_leaf_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_ulonglong])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    b = bcc.BPF(text=source)
    mod = b.module
    maps = []
    for i in range(lib.bpf_num_tables(mod)):
        name = lib.bpf_table_name(mod, i)
        maps.append({
            "name": name.decode(),
            "type": lib.bpf_table_type_id(mod, i),
            "key_size": int(lib.bpf_table_key_size_id(mod, i)),
            "value_size": int(lib.bpf_table_leaf_size_id(mod, i)),
            "max_entries": int(lib.bpf_table_max_entries_id(mod, i)),
            "flags": int(lib.bpf_table_flags_id(mod, i)),
            "child_fd": int(lib.bpf_table_fd_id(mod, i)),
            "key_desc": (lib.bpf_table_key_desc(mod, name) or b"").decode(),
            "leaf_desc": (lib.bpf_table_leaf_desc(mod, name) or b"").decode(),
        })
    import base64

    funcs = {}
    for i in range(lib.bpf_num_functions(mod)):
        fname = lib.bpf_function_name(mod, i)
        funcs[fname.decode()] = base64.b64encode(b.dump_func(fname)).decode()
    return {"format": 1, "license": (lib.bpf_module_license(mod) or b"GPL").decode(),
            "kern_version": int(lib.bpf_module_kern_version(mod)), "maps": maps, "funcs": funcs}


def main() -> int:
    source = sys.stdin.buffer.read()
    try:
        reply: dict = {"compiled": _compile(source)}
    except ImportError as exc:
        reply = {"error": "bcc", "message": str(exc)}
    except Exception as exc:  # BCC raises bare Exception for compile errors
        msg = str(exc)
        kind = "compile"
        if "kernel headers" in msg.lower() or "kheaders" in msg.lower():
            kind = "headers"
        elif "Operation not permitted" in msg or "EPERM" in msg:
            kind = "permission"
        reply = {"error": kind, "message": msg}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0 if "compiled" in reply else 1


if __name__ == "__main__":
    sys.exit(main())
