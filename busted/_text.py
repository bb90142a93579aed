"""Make attacker-controlled text safe to print on a terminal.

Process names (``prctl(PR_SET_NAME)``), SNIs, DNS names, command lines and paths come from the
kernel or the wire: anyone on the host or network picks them. Printed raw, a name like
``"\\x1b]0;OWNED\\x07"`` retitles the operator's terminal, ``"\\x1b[2J"`` clears it, ``"\\n"`` forges
a table row and U+202E (right-to-left override) reverses what follows. ``printable()`` is applied
to every such string before it reaches a table; ``--json`` output is escaped by ``json.dumps``
(``ensure_ascii=True``: only printable ASCII leaves it) and stays exact.
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape(ch: str) -> str:
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def printable(s: str) -> str:
    """``s`` with every character a terminal could act on written as a visible escape.

    Kept as is: printable ASCII (so ordinary names are unchanged) and other characters Python
    calls printable. Escaped as ``\\x1b`` / ``\\u202e`` / ``\\U000e0001``: C0 and C1 controls
    (incl. ``\\x9b``, the one-byte CSI), DEL, newline, carriage return, tab, format characters
    (bidi overrides and isolates, zero-width spaces and joiners, BOM, tag characters), lone
    surrogates, private-use and unassigned code points, and non-ASCII spaces and separators.
    """
    if s.isascii() and s.isprintable():  # the common case, one C-level scan
        return s
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)
