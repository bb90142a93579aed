"""Every flow says which service and which provider, with the evidence, for real clients in the lab."""

import sys
import time

import pytest
from conftest import collect

import busted
from busted import DnsAnswer, Evidence, FlowClassified, FlowClosed, FlowOpened, TlsClientHello
from busted.classify import Catalog, Provider

PY = sys.executable


def run(lab, mon, argv, *, stdin=None, want_close=True, timeout=15):
    """Run a real client in the lab's client namespace; return (pid, its events)."""
    import subprocess

    p = lab.spawn_client(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    p.communicate(input=stdin, timeout=timeout)
    pid = p.pid

    def done(evs):
        return any(isinstance(e, FlowClosed) and e.pid == pid for e in evs)

    evs = collect(mon, done if want_close else (lambda e: False), timeout=8 if want_close else 2)
    return pid, [e for e in evs if getattr(e, "pid", None) == pid]


def final_flow(evs, dport=443):
    closed = [e for e in evs if isinstance(e, FlowClosed) and e.dport == dport]
    assert len(closed) >= 1, evs
    return closed[-1]


# Both capture tiers: "cgroup" (packets at the cgroup root; the default) and "syscall" (the socket
# syscalls' tracepoints, for kernels without cgroup v2) must classify every client the same.
@pytest.fixture(scope="module", params=["cgroup", "syscall"])
def mon(lab, request):
    cat = Catalog.builtin()
    cat.add(Provider(id="lab-cidr-provider", name="Lab CIDR provider", category="hosted",
                     cidrs=(lab.bare_cidr, lab.bare_cidr6), source="test"))
    with busted.Monitor(catalog=cat, probes={"capture": request.param}) as m:
        assert m.plan is not None and m.plan.capture == request.param
        yield m


def test_curl_resolving_through_lab_dns(lab, mon):
    pid, evs = run(lab, mon, ["curl", "-s", "-m", "5", "https://api.openai.com/v1/chat/completions",
                              "-H", "authorization: Bearer sk-lab-secret", "-d", '{"model":"gpt-4o"}'])
    dns = [e for e in evs if isinstance(e, DnsAnswer)]
    assert dns and dns[0].qname == "api.openai.com" and dns[0].comm == "curl"
    assert set(dns[0].addresses) & set(lab.hosts["api.openai.com"].addresses)
    opened = [e for e in evs if isinstance(e, FlowOpened) and e.dport == 443][0]
    # DNS already named it when the connection opened; the ClientHello's SNI then confirms it
    assert (opened.hostname, opened.provider, opened.evidence) == ("api.openai.com", "openai", Evidence.DNS)
    hello = [e for e in evs if isinstance(e, TlsClientHello)][0]
    assert hello.sni == "api.openai.com" and hello.flow_id == opened.flow_id and hello.ja4.startswith("t13d")
    cls = [e for e in evs if isinstance(e, FlowClassified)][0]
    assert cls.evidence == Evidence.SNI and cls.flow_id == opened.flow_id
    c = final_flow(evs)
    assert (c.hostname, c.provider, c.evidence, c.comm) == ("api.openai.com", "openai", Evidence.SNI, "curl")
    assert "sk-lab-secret" not in repr(evs) and all("sk-lab-secret" not in str(e.to_dict()) for e in evs)


def test_python_httpx(lab, mon):
    code = (
        "import httpx, ssl, os; ctx = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE']);"
        "r = httpx.post('https://api.anthropic.com/v1/messages', json={'model': 'claude'},"
        " headers={'x-api-key': 'sk-ant-lab'}, verify=ctx); r.raise_for_status()"
    )
    pid, evs = run(lab, mon, [PY, "-c", code])
    c = final_flow(evs)
    assert (c.hostname, c.provider, c.evidence) == ("api.anthropic.com", "anthropic", Evidence.SNI)
    assert c.bytes_sent > 0 and c.bytes_received > 0


def test_openssl_s_client(lab, mon):
    pid, evs = run(lab, mon, ["openssl", "s_client", "-quiet", "-connect", "generativelanguage.googleapis.com:443",
                              "-CAfile", str(lab.ca_path)], stdin=b"GET / HTTP/1.0\r\n\r\n")
    c = final_flow(evs)
    assert (c.hostname, c.provider, c.evidence) == ("generativelanguage.googleapis.com", "google-gemini",
                                                     Evidence.SNI)


def test_gnutls_cli_is_not_openssl_and_still_classified(lab, mon):
    pid, evs = run(lab, mon, ["gnutls-cli", "--x509cafile", str(lab.ca_path), "x.openai.azure.com"],
                   stdin=b"")
    dns = [e for e in evs if isinstance(e, DnsAnswer) and e.qtype == "A"]
    assert dns and dns[0].cname_chain == ("x.openai.azure.com", "x.privatelink.openai.azure.com",
                                          "lab-edge.trafficmanager.net")
    hello = [e for e in evs if isinstance(e, TlsClientHello)][0]
    assert hello.sni == "x.openai.azure.com"
    c = final_flow(evs)
    assert (c.hostname, c.provider, c.evidence) == ("x.openai.azure.com", "azure-openai", Evidence.SNI)


def test_node_https(lab, mon):
    code = ("require('https').get('https://api.openai.com/v1/models', r => { r.resume(); "
            "r.on('end', () => process.exit(0)); }).on('error', e => { console.error(e); process.exit(1); });")
    pid, evs = run(lab, mon, ["node", "-e", code])
    c = final_flow(evs)
    assert (c.provider, c.evidence, c.comm) == ("openai", Evidence.SNI, "node")


def test_non_llm_host_is_not_an_llm(lab, mon):
    pid, evs = run(lab, mon, ["curl", "-s", "-m", "5", "https://www.example-nonllm.test/"])
    c = final_flow(evs)
    assert c.hostname == "www.example-nonllm.test" and c.provider is None and c.evidence == Evidence.SNI


def test_bare_ip_in_a_provider_cidr(lab, mon):
    pid, evs = run(lab, mon, ["curl", "-s", "-k", "-m", "5", f"https://{lab.bare_ip}/"])
    c = final_flow(evs)
    assert (c.provider, c.evidence, c.hostname) == ("lab-cidr-provider", Evidence.CIDR, None)
    assert not [e for e in evs if isinstance(e, TlsClientHello) and e.sni]


def test_dns_evidence_when_no_sni(lab, mon):
    """openssl resolves the name through the lab DNS, then connects sending no SNI."""
    pid, evs = run(lab, mon, ["openssl", "s_client", "-quiet", "-noservername", "-connect",
                              "api.anthropic.com:443", "-CAfile", str(lab.ca_path)], stdin=b"GET / HTTP/1.0\r\n\r\n")
    hello = [e for e in evs if isinstance(e, TlsClientHello)]
    assert hello and hello[0].sni is None
    c = final_flow(evs)
    assert (c.hostname, c.provider, c.evidence) == ("api.anthropic.com", "anthropic", Evidence.DNS)


def test_plain_http_to_local_ollama_port(lab, mon):
    h = lab.hosts["ollama.lab.test"]
    pid, evs = run(lab, mon, ["curl", "-s", "-m", "5", f"http://{h.ipv4}:11434/api/tags"])
    c = final_flow(evs, dport=11434)
    assert (c.provider, c.evidence) == ("ollama", Evidence.PORT)


def test_malformed_bytes_are_counted_never_raised(lab, mon):
    """A client that writes a broken TLS record: the Monitor counts a PARSE loss and keeps going."""
    h = lab.hosts["api.openai.com"]
    code = (f"import socket; s = socket.create_connection(('{h.ipv4}', 443), timeout=5);"
            "s.sendall(bytes([0x16, 3, 1, 0, 8, 1, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])); s.close()")
    before = mon.stats().lost.get("PARSE", 0)
    pid, evs = run(lab, mon, [PY, "-c", code])
    deadline = time.monotonic() + 3
    while mon.stats().lost.get("PARSE", 0) == before and time.monotonic() < deadline:
        list(mon.events(timeout=0.2))
    assert mon.stats().lost.get("PARSE", 0) == before + 1
    pid, evs = run(lab, mon, ["curl", "-s", "-m", "5", "https://api.openai.com/"])
    assert final_flow(evs).provider == "openai"  # still working


def test_local_server_by_name_still_matched_by_port(lab, mon):
    pid, evs = run(lab, mon, ["curl", "-s", "-m", "5", "http://ollama.lab.test:11434/api/tags"])
    c = final_flow(evs, dport=11434)
    assert (c.hostname, c.provider, c.evidence) == ("ollama.lab.test", "ollama", Evidence.PORT)


@pytest.mark.parametrize("argv,transport", [
    (["dig", "+short", "api.mistral.ai"], "udp"),
    (["dig", "+tcp", "+short", "x.openai.azure.com"], "tcp"),
    (["host", "-t", "A", "api.openai.com"], "udp"),
])
def test_dns_answers_from_other_resolvers(lab, mon, argv, transport):
    """Whatever the resolver (bind's dig/host here, glibc and Python elsewhere), UDP or TCP/53."""
    pid, evs = run(lab, mon, argv, want_close=False)
    answers = [e for e in evs if isinstance(e, DnsAnswer)]
    assert answers, evs
    qname = next(a for a in argv if "." in a)
    a = [x for x in answers if x.qname == qname][0]
    assert a.transport == transport and a.pid == pid and a.rcode in ("NOERROR", "NXDOMAIN")


def test_dns_answer_from_a_direct_dnspython_query(lab, mon):
    code = ("import dns.message, dns.query; q = dns.message.make_query('api.anthropic.com', 'A');"
            f"dns.query.udp(q, '{lab.dns_addr}', timeout=3)")
    pid, evs = run(lab, mon, [PY, "-c", code], want_close=False)
    a = [e for e in evs if isinstance(e, DnsAnswer)]
    assert a and a[0].qname == "api.anthropic.com" and a[0].server == lab.dns_addr
    assert set(a[0].addresses) & set(lab.hosts["api.anthropic.com"].addresses)
