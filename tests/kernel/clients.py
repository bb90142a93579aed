"""Lab client programs and CLI helpers shared by kernel test modules (a module, not conftest.py)."""

import os
import select
import socket
import time


def wait_ready(proc, timeout: float = 60.0) -> bytes:
    """Until a ``busted`` CLI's ready line (probes attached) is on its stderr; returns what was read.
    Read from the fd, unbuffered, so no later line is swallowed into a buffer the wait cannot see."""
    fd, buf, end = proc.stderr.fileno(), b"", time.monotonic() + timeout
    while b"busted: monitoring (" not in buf and time.monotonic() < end and proc.poll() is None:
        if select.select([fd], [], [], 0.2)[0]:
            buf += os.read(fd, 4096)
    assert b"busted: monitoring (" in buf, buf.decode(errors="replace")
    return buf


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gemini_client(key: str, text: str) -> str:
    """A stdlib Gemini generateContent client (API key in the query string, 5 output tokens) that
    prints the prompt and candidate token counts the lab answered with."""
    return f"""
import http.client, json, ssl
c = http.client.HTTPSConnection("generativelanguage.googleapis.com", 443, context=ssl.create_default_context())
body = json.dumps({{"contents": [{{"parts": [{{"text": {text!r}}}]}}],
                   "generationConfig": {{"maxOutputTokens": 5}}}})
c.request("POST", "/v1beta/models/gemini-1.5-flash:generateContent?key={key}", body=body,
          headers={{"Content-Type": "application/json"}})
u = json.loads(c.getresponse().read())["usageMetadata"]
print(u["promptTokenCount"], u["candidatesTokenCount"])
"""
