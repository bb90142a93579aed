"""Secret redaction: API keys and credentials never reach an event, a log or an export.

Command lines are the main carrier (``curl -H "Authorization: Bearer sk-..."``,
``tool --api-key sk-...``): ``redact_argv`` masks values of credential headers, of credential
flags, and tokens that look like provider API keys wherever they appear.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["MASK", "SECRET_HEADERS", "redact_argv", "redact_text"]

MASK = "[REDACTED]"
SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie")

# "Authorization: Bearer x", "x-api-key=x", "api-key: x" (header or key=value forms)
_HEADER = re.compile(r"(?i)\b(" + "|".join(re.escape(h) for h in SECRET_HEADERS) + r")(\s*[:=]\s*)(.+)")
# Flags whose next argument (or =value) is a secret.
_FLAG = re.compile(r"(?i)^--?(api[-_]?key|token|access[-_]?token|auth[-_]?token|secret|password|passwd|"
                   r"oauth2-bearer|key)(=(.*))?$")
# Provider key shapes: OpenAI/Anthropic sk-..., Google AIza..., Groq gsk_, xAI xai-, HF hf_, Replicate r8_,
# bearer tokens.
_TOKEN = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}|"
                    r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_-]{6,}|AIza[0-9A-Za-z_-]{20,}|gsk_[A-Za-z0-9]{10,}|"
                    r"xai-[A-Za-z0-9]{10,}|hf_[A-Za-z0-9]{10,}|r8_[A-Za-z0-9]{10,})")


def redact_text(s: str) -> str:
    m = _HEADER.search(s)
    if m:
        s = s[: m.start(3)] + MASK
    return _TOKEN.sub(lambda t: (t.group(1) + MASK) if t.group(1) else MASK, s)


def redact_argv(argv: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    secret_next = False
    for a in argv:
        if secret_next:
            out.append(MASK)
            secret_next = False
            continue
        m = _FLAG.match(a)
        if m:
            if m.group(2):
                out.append(a[: m.start(3)] + MASK)
            else:
                out.append(a)
                secret_next = True
            continue
        if a in ("-u", "--user", "--proxy-user"):  # curl user:password
            out.append(a)
            secret_next = True
            continue
        out.append(redact_text(a))
    return tuple(out)
