"""Regenerate the captured ClientHello fixtures: real clients against a local listener that
records the first bytes they write. Loopback only; each capture bounded to 3 s.

    sudo .venv/bin/python tests/unit/make_fixtures.py
"""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).with_name("fixtures")
SNI = "api.openai.com"


def capture(argv_for_port, name, expect):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    got = bytearray()

    def accept():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        c.settimeout(0.5)
        end = time.monotonic() + 2
        while time.monotonic() < end and len(got) < 16384:
            try:
                d = c.recv(65536)
            except OSError:
                break
            if not d:
                break
            got.extend(d)
        c.close()

    t = threading.Thread(target=accept)
    t.start()
    p = subprocess.Popen(argv_for_port(port), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t.join(4)
    p.kill()
    p.wait()
    srv.close()
    if got:
        (OUT / f"hello_{name}.hex").write_text(bytes(got).hex() + "\n")
        (OUT / f"hello_{name}.json").write_text(json.dumps(expect, indent=1) + "\n")
        print(name, len(got), "bytes")
    else:
        print(name, "captured nothing", file=sys.stderr)


PYCLIENT = """
import socket, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(sys.argv[3].split(','))
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)
try: ctx.wrap_socket(s, server_hostname=sys.argv[2])
except Exception: pass
"""
NODE = ("const tls=require('tls');const s=tls.connect({host:'127.0.0.1',port:+process.argv[1],servername:'"
        + SNI + "',ALPNProtocols:['h2','http/1.1'],rejectUnauthorized:false});s.on('error',()=>{});"
        "setTimeout(()=>process.exit(0),1500);")
MANY_ALPN = ",".join(["h2", "http/1.1"] + [f"x-busted-proto-{i:03d}-{'p' * 40}" for i in range(30)])

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    capture(lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-servername", SNI, "-alpn",
                       "h2,http/1.1"], "openssl", {"sni": SNI, "alpn": ["h2", "http/1.1"], "tls13": True})
    capture(lambda p: ["curl", "-sk", "-m", "2", "--resolve", f"{SNI}:{p}:127.0.0.1", f"https://{SNI}:{p}/"],
            "curl", {"sni": SNI, "alpn": ["h2", "http/1.1"], "tls13": True})
    capture(lambda p: ["gnutls-cli", "--insecure", "-p", str(p), "--sni-hostname", SNI, "--alpn", "h2",
                       "127.0.0.1"], "gnutls", {"sni": SNI, "alpn": ["h2"], "tls13": True})
    capture(lambda p: ["/usr/bin/python3", "-c", PYCLIENT, str(p), "api.anthropic.com", "h2,http/1.1"],
            "python", {"sni": "api.anthropic.com", "alpn": ["h2", "http/1.1"], "tls13": True})
    capture(lambda p: ["node", "-e", NODE, str(p)], "node", {"sni": SNI, "alpn": ["h2", "http/1.1"], "tls13": True})
    capture(lambda p: ["/usr/bin/python3", "-c", PYCLIENT, str(p), "generativelanguage.googleapis.com", MANY_ALPN],
            "python_large", {"sni": "generativelanguage.googleapis.com", "alpn": MANY_ALPN.split(","), "tls13": True})
