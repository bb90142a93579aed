"""Per flow: plaintext (per direction) -> HTTP events -> LlmCall / McpMessage events."""

from __future__ import annotations

from typing import Any

__all__ = ["CallReader"]


class CallReader:
    def __init__(self, flow: Any, *, capture_content: int = 0) -> None:
        self.flow = flow
        self.interesting: bool | None = None
        self.seen: list[tuple[bool, bytes]] = []

    def feed(self, sent: bool, data: bytes, ts_ns: int) -> list:
        if len(self.seen) < 64:
            self.seen.append((sent, data))
        return []

    def close(self, ts_ns: int) -> list:
        return []
