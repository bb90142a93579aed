"""Cross-check with the official SDKs: their real requests are recognised, and they parse our fixture
answers to the same usage we extract (so the fixtures have the providers' field names).

The SDKs talk to an httpx MockTransport that records the request and returns a fixture; the recorded
request and the fixture are then turned into HTTP events for the tracker. No network.
"""

from __future__ import annotations

import httpx
import needs
from test_classify_llm_bodies import (
    ANTH_RESP,
    ANTH_STREAM,
    EMB_RESP,
    OPENAI_CHAT_RESP,
    OPENAI_CHAT_STREAM_RESP,
    RESPONSES_STREAM,
    events,
    run,
)

openai = needs.module("openai", module_level=True)
anthropic = needs.module("anthropic", module_level=True)
httpx2 = needs.module("httpx2", why="the anthropic SDK's httpx fork", module_level=True)

OPENAI_KEY = "sk-proj-TESTKEY000000000000000000"
ANTH_KEY = "sk-ant-api03-TESTKEY0000000000000000"


class Recorder:
    def __init__(self, body: bytes, ctype: str) -> None:
        self.body, self.ctype = body, ctype
        self.request = None

    def __call__(self, request):
        request.read()
        self.request = request
        mod = httpx2 if type(request).__module__.startswith("httpx2") else httpx
        return mod.Response(200, headers={"content-type": self.ctype}, content=self.body)

    def client(self, mod=httpx):
        """An httpx client (the openai SDK) or an httpx2 one (the anthropic SDK insists on its fork)."""
        return mod.Client(transport=mod.MockTransport(self))

    def record(self, chunks: list[bytes]):
        r = self.request
        assert r is not None
        hdrs = tuple((k.decode().lower(), v.decode()) for k, v in r.headers.raw)
        evs = events(r.method, r.url.raw_path.decode(), r.content, 200, (("content-type", self.ctype),), chunks,
                     authority=r.url.netloc.decode(), req_headers=hdrs)
        out, _ = run(evs)
        assert len(out) == 1
        rec = out[0]
        assert OPENAI_KEY not in repr(rec) and ANTH_KEY not in repr(rec)
        return rec


def test_openai_sdk_chat_stream_with_usage():
    rec_ = Recorder(b"".join(OPENAI_CHAT_STREAM_RESP), "text/event-stream")
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url="https://llm-gw.internal/v1", http_client=rec_.client())
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    sdk_usage = chunks[-1].usage
    rec = rec_.record(OPENAI_CHAT_STREAM_RESP)
    assert (rec.api, rec.request_model, rec.stream, rec.authority) == ("openai.chat", "gpt-4o-mini", True,
                                                                        "llm-gw.internal")
    assert (rec.input_tokens, rec.output_tokens, rec.total_tokens) == (
        sdk_usage.prompt_tokens, sdk_usage.completion_tokens, sdk_usage.total_tokens)
    assert rec.response_model == chunks[0].model
    assert rec.user_agent == f"OpenAI/Python {openai.__version__}"


def test_openai_sdk_chat_tool_calls():
    rec_ = Recorder(OPENAI_CHAT_RESP, "application/json")
    client = openai.OpenAI(api_key=OPENAI_KEY, http_client=rec_.client())
    resp = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "weather?"}])
    rec = rec_.record([OPENAI_CHAT_RESP])
    assert rec.authority == "api.openai.com" and rec.path == "/v1/chat/completions"
    assert rec.tool_calls == len(resp.choices[0].message.tool_calls) == 2
    assert rec.cache_read_tokens == resp.usage.prompt_tokens_details.cached_tokens
    assert rec.finish_reason == resp.choices[0].finish_reason


def test_openai_sdk_responses_stream():
    rec_ = Recorder(b"".join(RESPONSES_STREAM), "text/event-stream")
    client = openai.OpenAI(api_key=OPENAI_KEY, http_client=rec_.client())
    evs = list(client.responses.create(model="gpt-5", input="Write a haiku", stream=True))
    final = evs[-1]
    assert final.type == "response.completed"
    rec = rec_.record(RESPONSES_STREAM)
    u = final.response.usage
    assert (rec.api, rec.input_tokens, rec.output_tokens, rec.cache_read_tokens, rec.reasoning_tokens,
            rec.total_tokens) == ("openai.responses", u.input_tokens, u.output_tokens,
                                  u.input_tokens_details.cached_tokens, u.output_tokens_details.reasoning_tokens,
                                  u.total_tokens)


def test_openai_sdk_embeddings_and_azure_deployment():
    rec_ = Recorder(EMB_RESP, "application/json")
    client = openai.AzureOpenAI(api_key="0123456789abcdef0123456789abcdef", api_version="2024-10-21",
                                azure_endpoint="https://contoso.openai.azure.com", http_client=rec_.client())
    resp = client.embeddings.create(model="my-embedder", input=["a", "b"])
    rec = rec_.record([EMB_RESP])
    assert rec.path == "/openai/deployments/my-embedder/embeddings?api-version=2024-10-21"
    assert (rec.api, rec.request_model, rec.input_tokens) == ("openai.embeddings", "my-embedder",
                                                              resp.usage.prompt_tokens)
    assert "0123456789abcdef" not in repr(rec)


def test_anthropic_sdk_stream_final_usage_matches():
    rec_ = Recorder(b"".join(ANTH_STREAM), "text/event-stream")
    client = anthropic.Anthropic(api_key=ANTH_KEY, http_client=rec_.client(httpx2))
    with client.messages.stream(model="claude-3-7-sonnet-latest", max_tokens=256,
                                messages=[{"role": "user", "content": "Hello"}]) as s:
        final = s.get_final_message()
    rec = rec_.record(ANTH_STREAM)
    u = final.usage
    assert (rec.api, rec.stream, rec.response_model) == ("anthropic.messages", True, final.model)
    # The SDK keeps the latest cumulative output count too; our input adds the cache parts (OTel).
    assert rec.output_tokens == u.output_tokens == 89
    assert rec.input_tokens == u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert (rec.cache_read_tokens, rec.cache_write_tokens) == (u.cache_read_input_tokens,
                                                               u.cache_creation_input_tokens)
    assert rec.finish_reason == final.stop_reason
    assert rec.tool_calls == sum(1 for b in final.content if b.type == "tool_use")
    assert rec.user_agent == f"Anthropic/Python {anthropic.__version__}"


def test_anthropic_sdk_message():
    rec_ = Recorder(ANTH_RESP, "application/json")
    client = anthropic.Anthropic(api_key=ANTH_KEY, base_url="http://10.1.2.3:4000",
                                 http_client=rec_.client(httpx2))
    msg = client.messages.create(model="house-claude", max_tokens=64, messages=[{"role": "user", "content": "x"}])
    rec = rec_.record([ANTH_RESP])
    assert (rec.authority, rec.path, rec.output_tokens, rec.finish_reason) == (
        "10.1.2.3:4000", "/v1/messages", msg.usage.output_tokens, msg.stop_reason)
