"""A test's tab on the page's event stream: a thread reading server-sent events (bounded in time)."""

import json
import threading
import time
import urllib.request


def open_tab(url: str, token: str, want: int, timeout: float = 10.0) -> tuple[threading.Thread, list]:
    """Read ``url`` (an /api/stream address) in a thread until ``want`` events came; returns the
    thread and the list the events (dicts) are appended to."""
    got: list = []

    def read() -> None:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:]))
                    if len(got) >= want:
                        return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


def wait_subscribed(state, timeout: float = 10.0) -> None:
    """Until the page's state has a tab subscribed (or ``timeout``)."""
    end = time.monotonic() + timeout
    while state.subscribers == 0 and time.monotonic() < end:
        time.sleep(0.05)
