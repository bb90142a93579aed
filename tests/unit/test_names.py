"""One host-name normaliser for the policy, its kernel compilation, the classifier and events:
trailing dot, case, IDNA (issue 18 item 1). The kernel twin is in policy_enforce.c."""

from hypothesis import given
from hypothesis import strategies as st

from busted import Policy
from busted.classify import Catalog, ClientHelloParser
from busted.classify.names import normalize_name
from busted.policy.enforce import NAME_MAX, compile_policy, name_entry, name_mask
from busted.policy.rules import Subject


def test_normalize_name_spellings_of_one_host():
    for spelling in ("api.anthropic.com", "api.anthropic.com.", "API.Anthropic.COM", " api.anthropic.com. "):
        assert normalize_name(spelling) == "api.anthropic.com"
    assert normalize_name("Bücher.DE.") == "xn--bcher-kva.de"
    assert normalize_name("xn--bcher-kva.de") == "xn--bcher-kva.de"


@given(st.text(max_size=80))
def test_normalize_name_never_raises_and_is_idempotent(s):
    n = normalize_name(s)
    assert normalize_name(n) == n or not n.isascii()


def test_policy_matches_every_spelling_and_unicode_rules():
    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-anthropic-host", "action": "deny", "hostname": "api.anthropic.com"},
        {"name": "no-buecher", "action": "deny", "hostname": "*.bücher.de"}]})
    for h in ("api.anthropic.com.", "API.ANTHROPIC.COM"):
        d = pol.evaluate(Subject(hostname=h))
        assert d is not None and d.rule == "no-anthropic-host"
    d = pol.evaluate(Subject(hostname="shop.xn--bcher-kva.de."))
    assert d is not None and d.rule == "no-buecher"


def test_kernel_keys_are_the_normalised_name():
    assert name_entry("API.Anthropic.com.", False) == name_entry("api.anthropic.com", False) == b"moc.ciporhtna.ipa\0"
    c = compile_policy(Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-x", "action": "deny", "hostname": "*.x.com"}]}), Catalog.builtin())
    long = "a" * 60 + "." + "b" * 58 + ".long-name.x.com"
    assert len(long) == 135 > NAME_MAX
    assert name_mask(c.names, long) & 1  # judged by its last NAME_MAX bytes: the suffix rule holds
    assert name_mask(c.names, long + ".") & 1
    assert name_mask(c.names, "api.x.com.") & 1


def _hello(sni: bytes) -> bytes:
    ext = b"\x00\x00" + (len(sni) + 5).to_bytes(2, "big") + (len(sni) + 3).to_bytes(2, "big") + b"\x00" \
        + len(sni).to_bytes(2, "big") + sni
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(ext).to_bytes(2, "big") + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_the_sni_in_events_is_normalised():
    p = ClientHelloParser()
    info = p.feed(_hello(b"API.Anthropic.com."))
    assert info.sni == "api.anthropic.com"
