"""Provider catalog and classifier: matching rules, overrides, precedence, caches."""

import json

import pytest
from test_classify_dns import response

from busted.classify import CATEGORIES, Catalog, Classifier, NameCache, Provider, parse_dns
from busted.events import Evidence


def test_builtin_catalog_is_complete_and_valid():
    cat = Catalog.builtin()
    assert len(cat) >= 25
    for p in cat.providers.values():
        assert p.category in CATEGORIES and p.source.startswith("https://")
        assert p.hostnames or p.suffixes or p.patterns or p.cidrs or p.ports
    for pid in ("openai", "azure-openai", "anthropic", "google-gemini", "google-vertex", "aws-bedrock", "mistral",
                "cohere", "groq", "together", "fireworks", "deepseek", "perplexity", "xai", "openrouter",
                "huggingface", "replicate", "cerebras", "ai21", "nvidia-nim", "moonshot", "dashscope", "voyage",
                "portkey", "helicone", "cloudflare-ai-gateway", "ollama"):
        assert pid in cat.providers


@pytest.mark.parametrize("host,pid,via", [
    ("api.openai.com", "openai", "hostname"),
    ("API.OpenAI.com.", "openai", "hostname"),
    ("x.openai.azure.com", "azure-openai", "suffix"),
    ("proj.services.ai.azure.com", "azure-openai", "suffix"),
    ("bedrock-runtime.eu-west-1.amazonaws.com", "aws-bedrock", "pattern"),
    ("us-central1-aiplatform.googleapis.com", "google-vertex", "pattern"),
    ("gateway.ai.cloudflare.com", "cloudflare-ai-gateway", "hostname"),
])
def test_match_host(host, pid, via):
    m = Catalog.builtin().match_host(host)
    assert (m.id, m.via) == (pid, via)


@pytest.mark.parametrize("host", ["evil-openai.com", "api.openai.com.evil.test", "openai.azure.com.evil.test",
                                  "bedrock-runtime.x.y.amazonaws.com", "example.com", ""])
def test_no_false_matches(host):
    assert Catalog.builtin().match_host(host) is None


def test_cidr_and_ports():
    cat = Catalog.builtin()
    assert cat.match_ip("160.79.104.1").id == "anthropic"
    assert cat.match_ip("::ffff:160.79.105.200").id == "anthropic"
    assert cat.match_ip("2607:6bc0::10").id == "anthropic"
    assert cat.match_ip("160.79.106.1") is None and cat.match_ip("not-an-ip") is None
    assert cat.match_port("127.0.0.1", 11434).id == "ollama"
    assert cat.match_port("8.8.8.8", 11434) is None


def test_overrides_from_python_json_and_toml(tmp_path):
    cat = Catalog.builtin()
    cat.add(Provider(id="openai", name="OpenAI via proxy", category="gateway", hostnames=("llm.corp.test",)))
    assert cat.match_host("llm.corp.test").provider.name == "OpenAI via proxy"
    assert cat.match_host("api.openai.com") is None  # replaced, not merged
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"providers": [{"id": "corp", "name": "Corp LLM", "category": "hosted",
                                            "suffixes": ["llm.corp.test"], "cidrs": ["10.9.0.0/16"],
                                            "source": "https://wiki.corp.test"}]}))
    c2 = Catalog.from_file(j)
    assert c2.match_host("a.llm.corp.test").id == "corp" and c2.match_ip("10.9.1.1").id == "corp"
    assert c2.match_host("api.openai.com").id == "openai"  # built-ins kept
    t = tmp_path / "c.toml"
    t.write_text('[[providers]]\nid = "t"\nname = "T"\ncategory = "local"\nports = [9999]\n')
    assert Catalog.from_file(t).match_port("127.0.0.1", 9999).id == "t"


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"providers": [{"id": "x", "name": "X", "category": "weird", "hostnames": ["a"]}]}', "category"),
    ('{"providers": [{"id": "x", "name": "X", "category": "hosted"}]}', "needs at least one"),
    ('{"providers": [{"id": "x", "name": "X", "category": "hosted", "cidrs": ["300.1.1.1/8"]}]}', "300.1.1.1"),
    ('{"nothing": 1}', "providers"),
])
def test_bad_catalog_files_name_the_path_and_problem(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        Catalog.from_file(p)
    assert str(p) in str(e.value)


def test_name_cache_ttl_clamp_bounds_and_namespaces():
    c = NameCache(maxsize=3, min_ttl=30, max_ttl=100, max_names_per_ip=2)
    c.put(1, "10.0.0.1", "a.test", source="dns", ttl=1, now=0)
    assert c.get(1, "10.0.0.1", now=29) and not c.get(1, "10.0.0.1", now=31)  # clamped up to 30 s
    c.put(1, "10.0.0.1", "b.test", source="dns", ttl=10_000, now=0)
    assert c.get(1, "10.0.0.1", now=99) and not c.get(1, "10.0.0.1", now=101)  # clamped down to 100 s
    for n in ("x.test", "y.test", "z.test"):
        c.put(2, "10.0.0.2", n, source="dns", ttl=60, now=0)
    assert [e.name for e in c.get(2, "10.0.0.2", now=1)] in (["z.test", "y.test"], ["y.test", "z.test"])
    assert c.get(None, "10.0.0.2", now=1) and c.get(7, "10.0.0.2", now=1)  # fallback to any namespace
    for i in range(5):
        c.put(3, f"10.0.1.{i}", "n.test", source="dns", now=0)
    assert len(c) <= 3 and c.stats.evictions >= 2


def test_classifier_precedence_and_chain():
    cl = Classifier()
    cl.observe_dns(5, parse_dns(response()), now=0)
    c = cl.classify(5, "10.1.2.3", 443, now=1)
    assert (c.hostname, c.provider, c.evidence) == ("x.openai.azure.com", "azure-openai", Evidence.DNS)
    c = cl.classify(5, "10.1.2.3", 443, sni="api.openai.com", now=1)
    assert (c.provider, c.evidence, c.confidence) == ("openai", Evidence.SNI, 0.95)
    c = cl.classify(5, "10.1.2.3", 443, sni="www.example.com", now=1)
    assert c.provider is None and c.evidence == Evidence.SNI  # an SNI is final
    assert cl.classify(5, "160.79.104.9", 443, now=1).evidence == Evidence.CIDR
    assert cl.classify(5, "127.0.0.1", 11434, now=1).evidence == Evidence.PORT
    assert cl.classify(5, "192.0.2.1", 443, now=1).evidence == Evidence.UNKNOWN
    assert cl.classify(5, "10.1.2.3", 443, now=10_000).evidence == Evidence.UNKNOWN  # expired


def test_shared_address_lowers_confidence():
    cl = Classifier()
    cl.observe_dns(None, parse_dns(response("api.openai.com", chain=(), addrs=("10.5.5.5",))), now=0)
    cl.observe_dns(None, parse_dns(response("api.anthropic.com", chain=(), addrs=("10.5.5.5",))), now=1)
    c = cl.classify(None, "10.5.5.5", 443, now=2)
    assert c.provider == "anthropic" and c.confidence < 0.8  # newest name, less sure


def test_peer_memo_ignores_ports_no_provider_is_known_by():
    """Accepted flows' peers arrive on a new ephemeral port each: one memo entry serves them all,
    and a memoised answer is the classifier's answer for every port, catalog ports included."""
    from busted.pipeline.enrich import Enricher

    enr = Enricher()
    cl = Classifier(enr.catalog, NameCache())
    assert 11434 in enr.catalog.ports and 443 not in enr.catalog.ports
    for port in [*range(40000, 40200), 11434, 443, 11434]:
        got = enr.classify_peer(None, "127.0.0.1", port, now=1.0)
        c = cl.classify(None, "127.0.0.1", port, now=1.0)
        assert got == (c.hostname, c.provider, c.evidence, c.confidence)
    assert enr.classify_peer(None, "127.0.0.1", 11434, now=1.0)[1] == "ollama"
    assert len(enr._memo) == 2  # (127.0.0.1, any other port) and (127.0.0.1, 11434)
