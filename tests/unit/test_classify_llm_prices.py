"""Call costs: genai-prices by provider / API URL / shape, user overrides (JSON, TOML), unknowns."""

from __future__ import annotations

import dataclasses
import json

import needs
import pytest
from test_classify_llm_bodies import ANTH_REQ, ANTH_RESP, JSON, OPENAI_CHAT_REQ, OPENAI_CHAT_RESP, events, run

from busted.classify.prices import Cost, PriceBook, genai_prices_version

VERSION = genai_prices_version()
needs_genai = pytest.mark.usefixtures("genai")


@pytest.fixture
def genai():
    if VERSION is None:
        needs.skip("genai-prices not installed (extra busted[prices])")


def call(evs):
    out, _ = run(evs)
    return out[0]


@needs_genai
def test_genai_prices_openai_with_cache_read():
    rec = call(events("POST", "/v1/chat/completions", OPENAI_CHAT_REQ, 200, JSON, [OPENAI_CHAT_RESP],
                      authority="api.openai.com"))
    c = PriceBook().call_cost(rec, provider="openai")
    assert c is not None
    assert (c.source, c.provider) == (f"genai-prices {VERSION}", "openai")
    from genai_prices import Usage, calc_price
    want = calc_price(Usage(input_tokens=1117, output_tokens=46, cache_read_tokens=1024, cache_write_tokens=0),
                      c.model, provider_id="openai").total_price
    assert c.usd == pytest.approx(float(want))
    # cached input is cheaper than fresh input: pricing it all as fresh must cost more
    fresh = PriceBook().cost(model="gpt-4o-2024-08-06", input_tokens=1117, output_tokens=46, provider="openai")
    assert fresh is not None and fresh.usd > c.usd


@needs_genai
def test_provider_found_from_api_url_or_shape():
    rec = call(events("POST", "/v1/messages", ANTH_REQ, 200, JSON, [ANTH_RESP], authority="api.anthropic.com"))
    by_url = PriceBook().call_cost(rec)
    gateway = PriceBook().call_cost(dataclasses.replace(rec, authority="llm-gw.corp.example"))
    assert by_url is not None and gateway is not None
    assert by_url.provider == gateway.provider == "anthropic"
    assert by_url.usd == gateway.usd > 0


@needs_genai
def test_unknown_and_local_calls_have_no_cost():
    pb = PriceBook()
    assert pb.cost(model="no-such-model-xyz", input_tokens=10, output_tokens=1) is None
    assert pb.cost(model="gpt-4o", input_tokens=None, output_tokens=1, provider="openai") is None
    assert pb.cost(model=None, input_tokens=10, output_tokens=1, provider="openai") is None
    assert pb.cost(model="gpt-4o", input_tokens=10, output_tokens=1, provider="ollama") is None
    assert pb.cost(model="gpt-4o", input_tokens=10, output_tokens=1, authority="127.0.0.1:8000") is None
    assert pb.cost(model="gpt-4o", input_tokens=10, output_tokens=1, cache_read_tokens=11, provider="openai") is None


def test_overrides_json_and_toml(tmp_path):
    data = {"openai": {"gpt-4o": {"input_per_mtok": 2.0, "output_per_mtok": 8.0, "cache_read_per_mtok": 0.5}},
            "*": {"house-model": {"input_per_mtok": 1.0, "output_per_mtok": 3.0}}}
    jp = tmp_path / "prices.json"
    jp.write_text(json.dumps(data))
    tp = tmp_path / "prices.toml"
    tp.write_text('[openai."gpt-4o"]\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\ncache_read_per_mtok = 0.5\n'
                  '["*".house-model]\ninput_per_mtok = 1.0\noutput_per_mtok = 3.0\n')
    for p in (jp, tp):
        pb = PriceBook.from_file(p)
        c = pb.cost(model="gpt-4o-2024-08-06", input_tokens=1_000_000, output_tokens=500_000,
                    cache_read_tokens=400_000, provider="openai")
        assert c == Cost(0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8.0, f"override {p}", "openai", "gpt-4o")
        local = pb.cost(model="House-Model", input_tokens=2_000_000, output_tokens=0, authority="10.0.0.5:8000")
        assert local == Cost(2.0, f"override {p}", "*", "house-model")


def test_override_errors_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        PriceBook({"openai": {"gpt-4o": {"input": 1}}})
    with pytest.raises(ValueError, match="input_per_mtok"):
        PriceBook({"openai": {"gpt-4o": {"output_per_mtok": 1}}})
    bad = tmp_path / "p.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=str(bad)):
        PriceBook.from_file(bad)


def test_without_genai_prices_only_overrides_price():
    pb = PriceBook({"openai": {"gpt-4o": {"input_per_mtok": 1}}}, use_genai_prices=False)
    assert not pb.has_genai_prices
    assert pb.cost(model="gpt-4o", input_tokens=10**6, output_tokens=0, provider="openai").usd == 1.0
    assert pb.cost(model="claude-sonnet-4-5", input_tokens=10, output_tokens=1, provider="anthropic") is None


@pytest.mark.parametrize("plant", ["owned-by-nobody", "group-writable", "world-writable-directory",
                                   "link-into-writable-directory"])
def test_a_price_file_another_user_can_change_is_refused(tmp_path, plant):
    """Issue 17: --prices was read as root whatever its owner; a user able to write it chooses the
    costs reported. Same trust rule as the bytecode cache (busted/_safe.py)."""
    import os

    from busted import Monitor
    from busted.errors import UsageError

    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    p = d / "prices.json"
    p.write_text(json.dumps({"openai": {"gpt-4o": {"input_per_mtok": 2.0}}}))
    p.chmod(0o644)
    PriceBook.from_file(p)  # ours, 0644, in a directory only we write: fine
    given = p
    if plant == "owned-by-nobody":
        os.chown(p, 65534, 65534)
    elif plant == "group-writable":
        p.chmod(0o664)
    elif plant == "world-writable-directory":
        d.chmod(0o777)
    else:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o777)
        shared.chmod(0o777)
        real = shared / "p.json"
        real.write_text(p.read_text())
        given = d / "link.json"
        given.symlink_to(real)
    for load in (PriceBook.from_file, lambda f: Monitor(prices=f)):
        with pytest.raises(UsageError, match="another user could change the costs reported") as ei:
            load(given)
        assert str(given) in str(ei.value) and "--prices" in str(ei.value) and "chmod go-w" in str(ei.value)
