"""printable(): attacker-chosen names cannot drive a terminal; ordinary ones are unchanged."""

import json
import string
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from busted._text import printable

# What a terminal (or a bidi-aware renderer) may act on: C0, DEL, C1 (incl. 0x9b CSI), and the
# Unicode format / separator / surrogate / private / unassigned categories.
_DANGEROUS_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _dangerous(ch: str) -> bool:
    return unicodedata.category(ch) in _DANGEROUS_CATEGORIES or (ch.isspace() and ch != " ")


@given(st.text(alphabet=st.characters(codec=None, categories=None), max_size=200))
def test_output_never_contains_a_control_or_format_char(s):
    out = printable(s)
    assert not any(_dangerous(ch) for ch in out), repr(out)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_printable_ascii_is_unchanged(s):
    assert printable(s) == s


@given(st.text(max_size=100))
def test_idempotent(s):
    once = printable(s)
    assert printable(once) == once


def test_the_attacks_from_the_issue_are_visible_escapes():
    assert printable("\x1b]0;OWNED\x07") == "\\x1b]0;OWNED\\x07"  # terminal title
    assert printable("x\n12:00:00 close 1 sshd") == "x\\x0a12:00:00 close 1 sshd"  # forged row
    assert printable("\x1b[31mred\x1b[2J") == "\\x1b[31mred\\x1b[2J"
    assert printable("\x9b2J") == "\\x9b2J"  # one-byte CSI (C1)
    assert printable("a\rb\tc\x7f") == "a\\x0db\\x09c\\x7f"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"  # right-to-left override
    for ch in "\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069":  # bidi embeddings and isolates
        assert printable(ch) == f"\\u{ord(ch):04x}"
    for ch in "\u200b\u200c\u200d\u2060\ufeff":  # zero-width
        assert printable(ch) == f"\\u{ord(ch):04x}"
    assert printable("\ud800") == "\\ud800"  # lone surrogate (from surrogateescape decoding)
    assert printable("\U000e0041") == "\\U000e0041"  # tag character
    assert printable("\u2028") == "\\u2028"  # line separator


def test_readable_unicode_names_are_kept():
    assert printable("api.openai.com") == "api.openai.com"
    assert printable("café 日本 Ωmega") == "café 日本 Ωmega"
    assert printable(string.punctuation + " ") == string.punctuation + " "


@given(st.text(max_size=100))
def test_json_lines_are_exact_and_printable_ascii(s):
    """--json output: json.dumps with ensure_ascii keeps the value exact and only prints
    printable ASCII, so it needs no printable()."""
    line = json.dumps({"sni": s}, ensure_ascii=True)
    assert json.loads(line)["sni"] == s
    assert all(0x20 <= ord(c) <= 0x7E for c in line), repr(line)


def test_first_ctrl_c_ends_the_monitor_loop_at_a_batch_boundary_the_second_interrupts():
    import os
    import signal
    import threading

    import pytest

    from busted.cli import _install_sigterm

    prev_int, prev_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    try:
        _install_sigterm(stop, sigint=True)
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread before the next line
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.pthread_kill(threading.main_thread().ident, 0)  # let the handler run
    finally:
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, prev_term)
