"""The lab's HTTP server on 127.0.0.1 (no root): real clients, HTTP/2 and HTTP/1.1 by ALPN, h2c, the log."""

import gzip
import json
import socket
import ssl
import subprocess

import needs
import pytest

needs.module("cryptography", module_level=True)
h2 = needs.module("h2", module_level=True)
httpx = needs.module("httpx", module_level=True)
needs.module("h2", why="httpx's HTTP/2 extra (httpx[http2])", module_level=True)

from busted.lab.http_server import LabHTTPServer, Listener, make_tls_context  # noqa: E402
from busted.lab.pki import LabCA  # noqa: E402

needs_curl = pytest.mark.usefixtures("curl_tool")


@pytest.fixture
def curl_tool():
    return needs.tool("curl")


@pytest.fixture(scope="module")
def lab_tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = LabCA(d)
    cert = ca.issue_server(["localhost"], ["127.0.0.1"])
    ctx = make_tls_context(str(cert.cert_path), str(cert.key_path))
    return ca.ca_path, ctx


@pytest.fixture(scope="module")
def srv(lab_tls):
    ca_path, ctx = lab_tls
    server = LabHTTPServer([Listener("tls", "127.0.0.1", 0), Listener("plain", "127.0.0.1", 0)], tls=ctx)
    with server:
        server.ca_path = ca_path
        server.tls_port = server.bound[0][2]
        server.plain_port = server.bound[1][2]
        yield server


def logged(srv, marker: str) -> list[dict]:
    return [r for r in srv.requests() if marker in r["path"]]


def curl(srv, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(["curl", "-sS", "-m", "10", "--cacert", str(srv.ca_path), *args],
                       capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stderr.decode()
    return r


def url(srv, path: str) -> str:
    return f"https://localhost:{srv.tls_port}{path}"


# ------------------------------------------------------------------------------------ HTTP/2
@needs_curl
def test_curl_http2_two_requests_one_connection(srv):
    chat, stream = '{"model":"gpt-4o"}', '{"model":"gpt-4o","stream":true}'
    r = curl(srv, "--http2", "-v", "-w", "\n%{http_version}\n", "-d", chat, url(srv, "/v1/chat/completions?m=h2a"),
             "--next", "--http2", "--cacert", str(srv.ca_path), "-w", "\n%{http_version}\n", "-d", stream,
             url(srv, "/v1/chat/completions?m=h2b"))
    first, v1, rest = r.stdout.split(b"\n", 2)
    assert v1 == b"2" and json.loads(first)["usage"]["prompt_tokens"] == len(chat) // 4
    assert rest.endswith(b"data: [DONE]\n\n\n2\n")  # the SSE answer, then -w's version
    assert b"Re-using existing connection" in r.stderr
    a, b = logged(srv, "?m=h2a"), logged(srv, "?m=h2b")
    assert len(a) == len(b) == 1
    assert (a[0]["http_version"], a[0]["alpn"], b[0]["http_version"]) == ("2", "h2", "2")
    assert a[0]["conn"] == b[0]["conn"] and (a[0]["stream_id"], b[0]["stream_id"]) == (1, 3)
    assert a[0]["host"] == f"localhost:{srv.tls_port}"  # :authority, seen as the Host


@needs_curl
def test_curl_http2_parallel_streams_multiplexed(srv):
    urls = [url(srv, f"/v1/chat/completions?m=par{i}") for i in range(3)]
    # one -d for the group: every URL is POSTed the same body, all at once
    r = curl(srv, "--http2", "--parallel", "--parallel-max", "3", "-d", '{"stream":true}', *urls)
    assert r.stdout.count(b"data: [DONE]") == 3
    recs = [logged(srv, f"?m=par{i}")[0] for i in range(3)]
    assert {x["http_version"] for x in recs} == {"2"}
    assert len({x["conn"] for x in recs}) == 1 and len({x["stream_id"] for x in recs}) == 3


def test_http2_flow_control_both_ways(srv):
    # a request body and an answer both larger than HTTP/2's default 65,535-byte window
    big = {"model": "e", "input": [f"text {i}" for i in range(30)], "dimensions": 3072, "pad": "x" * 200_000}
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=srv.ca_path), timeout=10) as c:
        resp = c.post(url(srv, "/v1/embeddings?m=big"), json=big)
    assert resp.http_version == "HTTP/2" and resp.status_code == 200
    data = resp.json()["data"]
    assert len(data) == 30 and all(len(d["embedding"]) == 3072 for d in data)
    (rec,) = logged(srv, "?m=big")
    assert rec["received_bytes"] == len(resp.request.content) > 200_000 and rec["sent_bytes"] > 65_535


def test_httpx_http2_stream_and_gzip(srv):
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=srv.ca_path), timeout=10) as c:
        j = c.post(url(srv, "/v1/messages?m=hx1"), json={"model": "claude", "max_tokens": 3})
        assert j.http_version == "HTTP/2" and j.headers["content-encoding"] == "gzip"  # httpx asks for gzip
        assert j.json()["usage"]["output_tokens"] == 3
        body = json.dumps({"model": "claude", "stream": True}).encode()
        with c.stream("POST", url(srv, "/v1/messages?m=hx2"), content=body) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("event: ")]
        assert lines[0] == "event: message_start" and lines[-1] == "event: message_stop"
    one, two = logged(srv, "?m=hx1")[0], logged(srv, "?m=hx2")[0]
    assert one["conn"] == two["conn"] and {one["http_version"], two["http_version"]} == {"2"}
    assert two["usage"] == {"input": len(body) // 4, "output": 8, "cache_read": 0}


# ------------------------------------------------------------------------------------ HTTP/1.1
@needs_curl
def test_curl_http11_keepalive_chunked_and_100_continue(srv):
    r = curl(srv, "--http1.1", "-v", "-H", "Expect: 100-continue", "-d", '{"model":"a"}',
             url(srv, "/v1/responses?m=k1"),
             "--next", "--http1.1", "--cacert", str(srv.ca_path), "-H", "Transfer-Encoding: chunked",
             "-d", '{"model":"a","stream":true}', url(srv, "/v1/responses?m=k2"))
    assert b"HTTP/1.1 100 Continue" in r.stderr and b"Re-using existing connection" in r.stderr
    assert b"event: response.completed" in r.stdout
    k1, k2 = logged(srv, "?m=k1")[0], logged(srv, "?m=k2")[0]
    assert (k1["http_version"], k1["alpn"], k1["stream_id"]) == ("1.1", "http/1.1", None)
    assert k1["conn"] == k2["conn"]
    assert (k1["received_bytes"], k2["received_bytes"]) == (len('{"model":"a"}'), len('{"model":"a","stream":true}'))
    assert k2["usage"]["input"] == len('{"model":"a","stream":true}') // 4


def test_no_alpn_is_http11_with_gzip(srv):
    ctx = ssl.create_default_context(cafile=str(srv.ca_path))  # offers no ALPN
    req = (b"POST /v1/chat/completions?m=noalpn HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\n"
           b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(req)
            data = b""
            for _ in range(1000):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-encoding: gzip" in head
    assert json.loads(gzip.decompress(body))["usage"]["prompt_tokens"] == 1
    (rec,) = logged(srv, "?m=noalpn")
    assert (rec["alpn"], rec["http_version"]) == (None, "1.1")


# ------------------------------------------------------------------------------------ plain HTTP
@needs_curl
def test_plain_http_ndjson(srv):
    body = '{"model":"llama3","prompt":"hi"}'
    r = subprocess.run(["curl", "-sS", "-m", "10", "-d", body,
                        f"http://127.0.0.1:{srv.plain_port}/api/generate?m=nd"], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["done"] for x in lines] == [False] * 8 + [True]
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (len(body) // 4, 8)
    (rec,) = logged(srv, "?m=nd")
    assert (rec["flavour"], rec["http_version"], rec["alpn"]) == ("plain", "1.1", None)


@needs_curl
def test_plain_h2c_prior_knowledge(srv):
    r = subprocess.run(["curl", "-sS", "-m", "10", "--http2-prior-knowledge", "-w", "\n%{http_version}",
                        "-d", '{"stream":false}', f"http://127.0.0.1:{srv.plain_port}/api/chat?m=h2c"],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    body, version = r.stdout.rsplit(b"\n", 1)
    assert version == b"2" and json.loads(body)["done"] is True
    (rec,) = logged(srv, "?m=h2c")
    assert (rec["http_version"], rec["stream_id"]) == ("2", 1)


# ------------------------------------------------------------------------------------ the log
def test_log_is_bounded_and_empty_without_requests(lab_tls):
    ca_path, ctx = lab_tls
    with LabHTTPServer([Listener("tls", "127.0.0.1", 0)], tls=ctx, log_size=2) as small:
        port = small.bound[0][2]
        cctx = ssl.create_default_context(cafile=str(ca_path))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with cctx.wrap_socket(raw, server_hostname="localhost"):
                pass  # a handshake is not a request
        assert small.requests() == []
        with httpx.Client(verify=ssl.create_default_context(cafile=ca_path), timeout=10) as c:
            for i in range(3):
                assert c.get(f"https://localhost:{port}/n{i}").json()["path"] == f"/n{i}"
        assert [r["path"] for r in small.requests()] == ["/n1", "/n2"]


def test_answer_after_client_close_notify(srv):
    needs.tool("gnutls-cli")
    # gnutls-cli sends close_notify once stdin ends, before the answer: a half-close, still answered
    req = b"GET /?m=halfclose HTTP/1.1\r\nHost: localhost\r\n\r\n"
    r = subprocess.run(["gnutls-cli", "--x509cafile", str(srv.ca_path), "-p", str(srv.tls_port), "localhost"],
                       input=req, capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert b"HTTP/1.1 200 OK" in r.stdout and b'"path":"/?m=halfclose"' in r.stdout
    (rec,) = logged(srv, "?m=halfclose")
    assert (rec["alpn"], rec["http_version"]) == (None, "1.1")


def _plain_exchange(srv, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=5) as s:
        s.sendall(request)
        data = b""
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_http10_stream_is_close_delimited_and_garbage_is_400(srv):
    body = b'{"model":"m"}'
    data = _plain_exchange(srv, b"POST /api/chat?m=h10 HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding" not in head.lower()
    assert json.loads(rest.splitlines()[-1])["eval_count"] == 8  # NDJSON until the server closes
    assert logged(srv, "?m=h10")[0]["http_version"] == "1.0"
    assert _plain_exchange(srv, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_h2_reset_stream_leaves_the_connection_usable(srv):
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context(cafile=str(srv.ca_path))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            hdrs = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost")]
            conn.send_headers(1, [*hdrs, (":path", "/v1/chat/completions?m=rst")])
            conn.send_data(1, b'{"stream":')  # a half-sent body...
            conn.reset_stream(1)  # ...abandoned
            conn.send_headers(3, [*hdrs, (":path", "/v1/embeddings?m=after")], end_stream=False)
            conn.send_data(3, b'{"input":"x"}', end_stream=True)
            s.sendall(conn.data_to_send())
            body, ended = b"", False
            for _ in range(1000):
                data = s.recv(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id == 3:
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, 3)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 3:
                        ended = True
                s.sendall(conn.data_to_send())
                if ended:
                    break
    assert ended and json.loads(body)["usage"]["prompt_tokens"] == len(b'{"input":"x"}') // 4
    assert logged(srv, "?m=rst") == [] and logged(srv, "?m=after")[0]["stream_id"] == 3


def test_no_length_option_makes_http10_answers_close_delimited(srv):
    """``x-busted-lab-no-length: 1``: a non-streamed answer without Content-Length; to HTTP/1.0 the
    body ends when the server closes, to HTTP/1.1 it is chunked. The delay options are accepted."""
    body = b'{"model":"gpt-4o","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"x-busted-lab-no-length: 1\r\nx-busted-lab-delay-ms: 5\r\nx-busted-lab-chunk-delay-ms: 1\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as s:
        s.sendall(req)
        got = b""
        while chunk := s.recv(65536):  # until the server closes
            got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()  # h11 speaks 1.1
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert json.loads(rest)["usage"]["completion_tokens"] == 2
    r = httpx.post(f"http://127.0.0.1:{srv.plain_port}/v1/chat/completions", content=body,
                   headers={"x-busted-lab-no-length": "1"})
    assert r.headers.get("transfer-encoding") == "chunked" and r.json()["usage"]["completion_tokens"] == 2
