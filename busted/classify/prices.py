"""What an LLM call cost, from its provider, model and token counts.

Prices come from the ``genai-prices`` package (Pydantic's maintained, offline price data for
dozens of providers, with cache-read/write prices and history; extra ``busted[prices]``) and,
first, from a user's override file::

    {"openai": {"gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10, "cache_read_per_mtok": 1.25}},
     "*": {"my-finetune": {"input_per_mtok": 1, "output_per_mtok": 2}}}

(JSON, or the same tables in TOML). Provider keys are busted catalog ids (``openai``,
``aws-bedrock``, ...) or ``*`` for any; a model key matches the model exactly, else as its
longest prefix (``gpt-4o`` prices ``gpt-4o-2024-08-06``). Prices are USD per million tokens.

Token semantics are OTel's, as in ``LlmCallInfo``: ``input_tokens`` includes cache reads and
writes, which are priced at their own rates when given. Unknown = None: a call whose model or
input count is unknown, a local server (Ollama, llama.cpp, vLLM, LM Studio, a loopback or private
address), or a model no source knows, has no cost. Never raises.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from busted.classify.llm import LlmCallInfo
from busted.errors import UsageError

__all__ = ["Cost", "PriceBook", "genai_prices_version"]

# busted catalog id -> genai-prices provider id, where they differ
_GENAI_IDS = {"aws-bedrock": "aws", "azure-openai": "azure", "google-gemini": "google", "google-vertex": "google",
              "xai": "x-ai", "moonshot": "moonshotai", "voyage": "voyageai"}
# Shapes that name their provider when the catalog could not (an unknown host speaking the API).
_SHAPE_PROVIDER = {"anthropic.messages": "anthropic", "gemini.generate_content": "google",
                   "gemini.embed_content": "google", "bedrock.converse": "aws", "bedrock.invoke": "aws"}
_LOCAL_PROVIDERS = frozenset(("ollama", "llama-cpp", "lm-studio", "vllm"))
_RATES = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    source: str  # "genai-prices 0.2.3", or "override <file>"
    provider: str | None  # the price source's provider id
    model: str | None  # the model the price was found for


def genai_prices_version() -> str | None:
    """The installed genai-prices version, None when it is not installed."""
    try:
        from importlib.metadata import version

        return version("genai-prices")
    except Exception:
        return None


def _is_local(authority: str | None) -> bool:
    if not authority:
        return False
    host = authority
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local"):
        return True
    try:
        a = ipaddress.ip_address(host)
    except ValueError:
        return False
    return a.is_loopback or a.is_private or a.is_link_local


def _rate(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    return None


class PriceBook:
    """Prices for calls; ``PriceBook()`` uses genai-prices alone, ``from_file`` adds overrides."""

    def __init__(self, overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, *,
                 source: str = "override", use_genai_prices: bool = True) -> None:
        self._over: dict[str, dict[str, dict[str, float]]] = {}
        for prov, models in (overrides or {}).items():
            if not isinstance(models, Mapping):
                raise UsageError(f"price override for {prov!r} must map model -> rates")
            table: dict[str, dict[str, float]] = {}
            for model, rates in models.items():
                if not isinstance(rates, Mapping):
                    raise UsageError(f"price override {prov!r}/{model!r} must be a table of rates")
                unknown = set(rates) - set(_RATES)
                if unknown:
                    raise UsageError(f"price override {prov!r}/{model!r}: unknown key(s) {sorted(unknown)}; "
                                     f"use {', '.join(_RATES)}")
                clean = {k: r for k in _RATES if (r := _rate(rates.get(k))) is not None}
                if "input_per_mtok" not in clean:
                    raise UsageError(f"price override {prov!r}/{model!r} needs a non-negative input_per_mtok")
                table[str(model).lower()] = clean
            self._over[str(prov)] = table
        self._source = source
        self._genai = use_genai_prices and genai_prices_version() is not None

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> PriceBook:
        """Overrides from a JSON or TOML file (by extension; ``.toml`` is TOML, anything else JSON).
        The file must be one only root or this user can change (``busted._safe.read_input``:
        the costs reported are what it says)."""
        from busted._safe import read_input

        p = Path(path)
        raw = read_input(p, "--prices", "change the costs reported")
        try:
            text = raw.decode("utf-8")
            data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read price overrides from {p}: {e}") from e
        if not isinstance(data, dict):
            raise UsageError(f"price overrides in {p} must be a table of providers")
        return cls(data, source=f"override {p}", **kw)

    @property
    def has_genai_prices(self) -> bool:
        return self._genai

    def call_cost(self, call: LlmCallInfo, provider: str | None = None) -> Cost | None:
        """The cost of one call; ``provider`` is the flow's catalog id when known."""
        try:
            model = call.response_model or call.request_model
            output = call.output_tokens
            if output is None and call.operation == "embeddings":
                output = 0
            if provider is None and call.api.startswith("ollama."):
                provider = "ollama"
            return self.cost(model=model, input_tokens=call.input_tokens, output_tokens=output,
                             cache_read_tokens=call.cache_read_tokens, cache_write_tokens=call.cache_write_tokens,
                             provider=provider, authority=call.authority, api=call.api)
        except Exception:
            return None

    def cost(self, *, model: str | None, input_tokens: int | None, output_tokens: int | None,
             cache_read_tokens: int | None = None, cache_write_tokens: int | None = None,
             provider: str | None = None, authority: str | None = None, api: str | None = None) -> Cost | None:
        if not model or input_tokens is None or output_tokens is None:
            return None
        cr, cw = cache_read_tokens or 0, cache_write_tokens or 0
        if cr + cw > input_tokens:  # inconsistent counts: price nothing rather than something wrong
            return None
        c = self._override(provider, model, input_tokens, output_tokens, cr, cw)
        if c is not None:
            return c
        if not self._genai or provider in _LOCAL_PROVIDERS or (provider is None and _is_local(authority)):
            return None
        try:
            return self._genai_cost(model, input_tokens, output_tokens, cr, cw, provider, authority, api)
        except Exception:
            return None

    def _override(self, provider: str | None, model: str, inp: int, out: int, cr: int, cw: int) -> Cost | None:
        m = model.lower()
        for prov in ((provider, "*") if provider else ("*",)):
            table = self._over.get(prov or "")
            if not table:
                continue
            key = m if m in table else max((k for k in table if m.startswith(k)), key=len, default=None)
            if key is None:
                continue
            r = table[key]
            i_rate = r["input_per_mtok"]
            usd = ((inp - cr - cw) * i_rate + cr * r.get("cache_read_per_mtok", i_rate)
                   + cw * r.get("cache_write_per_mtok", i_rate) + out * r.get("output_per_mtok", 0.0)) / 1e6
            return Cost(usd, self._source, prov, key)
        return None

    def _genai_cost(self, model: str, inp: int, out: int, cr: int, cw: int, provider: str | None,
                    authority: str | None, api: str | None) -> Cost | None:
        from genai_prices import Usage, calc_price

        usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cr, cache_write_tokens=cw)
        attempts: list[tuple[str | None, str | None]] = []  # (provider_id, provider_api_url), at most one
        if provider:
            attempts.append((_GENAI_IDS.get(provider, provider), None))
        if authority:
            attempts.append((None, f"https://{authority}"))
        hint = _SHAPE_PROVIDER.get(api or "")
        if hint:
            attempts.append((hint, None))
        attempts.append((None, None))  # the model name alone (an unknown gateway passing "gpt-4o" through)
        for provider_id, api_url in attempts:
            try:  # two calls, not one with both: calc_price's overloads take one or the other
                if api_url is not None:
                    r = calc_price(usage, model, provider_api_url=api_url)
                else:
                    r = calc_price(usage, model, provider_id=provider_id)
            except LookupError:
                continue
            return Cost(float(r.total_price), f"genai-prices {genai_prices_version()}", r.provider.id, r.model.id)
        return None
