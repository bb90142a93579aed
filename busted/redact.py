"""Secret redaction: API keys and credentials never reach an event, a log or an export.

Command lines are the main carrier (``curl -H "Authorization: Bearer sk-..."``,
``tool --api-key sk-...``, ``docker run -e OPENAI_API_KEY=sk-...``). Two kinds of rule, both
applied everywhere (rules and thresholds: docs/security.md):

* by **name**: the value given to a credential-named flag, variable, field or header is masked,
  the name is kept (``--openai-api-key [REDACTED]``, ``api_key=[REDACTED]``,
  ``Authorization: [REDACTED]``, ``https://user:[REDACTED]@host``);
* by **shape**: provider key prefixes (``sk-``, ``AIza``, ``ghp_``, ``AKIA``...), JWTs, bearer
  tokens and long high-entropy tokens are masked wherever they appear.

``redact_argv`` (command lines), ``redact_text`` (free text: a header value, a body, a log line),
``redact_url`` (a request path or URL) and ``redact_headers`` (``(name, value)`` lists) never raise and
are idempotent. They are the one redaction of every output: the events are built with them (an
``LlmCall``'s path, user agent and captured content) and the sinks apply them again by field name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TypeVar

__all__ = ["MASK", "SECRET_HEADERS", "is_secret_name", "looks_secret", "redact_argv", "redact_headers",
           "redact_id", "redact_text", "redact_url"]

MASK = "[REDACTED]"
SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie",
                  "set-cookie")

# -- names ------------------------------------------------------------------------------------------
# A name is split into words (separators, camelCase); it is a credential name if its LAST word is
# one of _WORDS, or the words joined end with one of _SUFFIXES ("PGPASSWORD", "apikey").
# Last word only: "--api-key" and "OPENAI_API_KEY" match, "--key-file", "--token-limit",
# "--max-tokens", "--auth-type", "--keep-alive", "--monkey" and "--author" do not.
_WORDS = frozenset({
    "key", "apikey", "token", "secret", "password", "passwd", "pwd", "pass", "passphrase", "credential",
    "credentials", "creds", "auth", "authorization", "cookie", "bearer", "sessionid", "signature",
})
_SUFFIXES = ("apikey", "accesskey", "secretkey", "privatekey", "authkey", "sessionkey", "token", "secret",
             "password", "passwd", "passphrase", "credential", "credentials", "cookie", "authorization",
             "sessionid")
# Header names whose whole value (to the end of the line or the closing quote) is the credential:
# "Authorization: Bearer x", "Cookie: a=1; b=2".
_LINE_NAMES = frozenset({"authorization", "proxyauthorization", "cookie", "setcookie"})
_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _words(name: str) -> list[str]:
    return [w.lower() for w in _SPLIT.split(name) if w]


def is_secret_name(name: str) -> bool:
    """True if ``name`` (a flag, variable, JSON field, query parameter or header name) names a
    credential: ``api_key``, ``--openai-api-key``, ``apiKey``, ``X-Goog-Api-Key``, ``PGPASSWORD``."""
    w = _words(name)
    if not w or w[0] == "no" and len(w) > 1:  # "--no-auth" is a switch, not a credential
        return False
    return w[-1] in _WORDS or "".join(w).endswith(_SUFFIXES)


def _line_name(name: str) -> bool:
    w = _words(name)
    return "".join(w[-2:]) in _LINE_NAMES or (bool(w) and w[-1] in _LINE_NAMES)  # "-HAuthorization"


# -- shapes -----------------------------------------------------------------------------------------
_T = r"A-Za-z0-9_\-"  # token alphabet of most provider keys
_PROVIDER = (
    rf"sk-(?:ant-|proj-|svcacct-|admin-|or-)?[{_T}]{{20,}}"  # OpenAI, Anthropic, DeepSeek, OpenRouter
    rf"|sk-(?=[A-Za-z_\-]{{0,64}}[0-9])[{_T}]{{10,}}"  # short sk- keys only with a digit ("sk-learn-intelex" is not)
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys
    r"|ya29\.[0-9A-Za-z_\-]{20,}"  # Google OAuth access tokens
    r"|gsk_[A-Za-z0-9]{10,}|xai-[A-Za-z0-9]{10,}|hf_[A-Za-z0-9]{10,}|r8_[A-Za-z0-9]{10,}"  # Groq xAI HF Replicate
    r"|pplx-[A-Za-z0-9]{10,}|nvapi-[A-Za-z0-9_\-]{10,}|fw_[A-Za-z0-9]{10,}"  # Perplexity, NVIDIA, Fireworks
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_\-]{20,}"  # GitHub, GitLab
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
    r"|npm_[A-Za-z0-9]{30,}|lsv2_[a-z]{2}_[A-Za-z0-9_]{20,}"  # npm, LangSmith
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # JWT (header and claims are JSON)
)
_SHAPE = re.compile(rf"(?<![A-Za-z0-9])(?:{_PROVIDER})")
_BEARER = re.compile(r"(?i)(?<![A-Za-z0-9])(bearer\s+)([A-Za-z0-9._~+/=\-]{8,})")
# Candidates for the entropy rule: runs of base64/base64url/hex characters, 32 or longer.
# "=" only as base64 padding, so "x=<token>" is judged on the token alone.
_RUN = re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{32,}={0,2}")
_DIGEST = re.compile(r"(?i)(?:sha1|sha224|sha256|sha384|sha512|md5):$")

MIN_TOKEN_LEN = 32  # shorter unprefixed tokens are left alone (ids, short hashes, words)
MIN_ENTROPY = 3.5  # bits/char; random 32-char base62/base64: median 4.55, lowest of 300,000 3.74
MIN_CASE_SHARE = 0.3  # no digit: each case >= 30% of the letters (random ~50%; "ThisIsCamelCase" ~25%)
MIN_ENTROPY_HEX = 2.5  # hex (max 4 bits/char); random 32-char hex: median 3.62, lowest of 300,000 2.77


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


# A name built from words: "models--meta-llama--Llama-2-7b-chat-hf", "x86_64-linux-gnu/libssl",
# "Meta-Llama-3-70B-Instruct-GGUF-Q4_K_M". Every piece is a word, a number or 3 characters at most;
# a random token's long pieces almost never are ((26/62)**n for an n-character all-lowercase piece).
_PIECE = re.compile(r"[a-z]+[0-9]*|[A-Z][a-z]+[0-9]*|[A-Z]+[0-9]*|[0-9]+[A-Za-z]?|.{0,3}", re.DOTALL)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _name_like(t: str) -> bool:
    pieces = re.split(r"[-_/+]", t)
    return len(pieces) >= 3 and all(_PIECE.fullmatch(p) for p in pieces)


def looks_secret(tok: str) -> bool:
    """The entropy rule for a bare token without a known prefix (thresholds: docs/security.md)."""
    t = tok.strip("=")
    if len(t) < MIN_TOKEN_LEN or _UUID.fullmatch(t) or _name_like(t):  # paths are names too
        return False
    digits = sum(c.isdigit() for c in t)
    upper = sum(c.isupper() for c in t)
    lower = sum(c.islower() for c in t)
    if not upper + lower:
        return False
    if not digits and min(upper, lower) < MIN_CASE_SHARE * (upper + lower):
        return False  # letters only: random if the cases are mixed throughout, not camelCase words
    if all(c in "0123456789abcdefABCDEF" for c in t):
        return _entropy(t) >= MIN_ENTROPY_HEX
    return _entropy(t) >= MIN_ENTROPY


# -- text -------------------------------------------------------------------------------------------
# Every pattern below is linear in the input (it redacts attacker-sized bodies): each one starts only
# at a token boundary (a look-behind that rejects the characters it would consume) and names are
# bounded, so no position is rescanned from every earlier start.
# "user:pass@" in a URL authority.
_URL_CRED = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]{0,31}://[^\s/?#@:]*:)([^\s/?#]+)(@)")
# name (optionally quoted, as in JSON; a flag's dashes or npm's "_authToken" underscore) then ":" or "=".
_KV = re.compile(r"""(?<![A-Za-z0-9_.\-])(?P<q0>["']?)[-_]{0,2}(?P<name>[A-Za-z][A-Za-z0-9_.\-]{0,127})(?P=q0)"""
                 r"""(?P<sep>[ \t]*[:=][ \t]*)""")
# the value after a credential name and its separator: quoted, or one token (with its auth scheme)
_VAL = re.compile(r""""[^"\r\n]*"?|'[^'\r\n]*'?|(?:(?:bearer|basic|token|digest)[ \t]+)?[^\s&,;"'<>]+""",
                  re.IGNORECASE)
# "--name value" inside one string (sh -c '... --api-key sk-...').
_FLAG_SPACE = re.compile(r"""(?<![A-Za-z0-9_.\-])(--?(?P<name>[A-Za-z][A-Za-z0-9_.\-]{0,127}))(?P<sp>[ \t]+)"""
                         r"""(?P<val>"[^"]*"?|'[^']*'?|[^\s"']+)""")


def _mask_value(val: str) -> str:
    if len(val) >= 2 and val[0] in "\"'" and val[-1] == val[0]:
        return val[0] + MASK + val[0]
    if val[:1] in ("\"", "'"):
        return val[0] + MASK
    return MASK


_STOP = {"": re.compile(r"[\r\n]"), '"': re.compile(r'[\r\n"]'), "'": re.compile(r"[\r\n']")}


def _line_end(s: str, m: re.Match[str]) -> int:
    """Where a header value that starts after ``m``'s separator ends: the closing quote if the
    header sat in a quoted string (``sh -c 'curl -H "Authorization: Bearer x" ...'``), else the
    end of the line."""
    start = m.start()
    q = s[start - 1] if start and not m.group("q0") and s[start - 1] in "\"'" else ""
    stop = _STOP[q].search(s, m.end("sep"))  # one scan to the first stop, not one per stop character
    return stop.start() if stop else len(s)


def _sub_kv(s: str) -> str:
    out: list[str] = []
    pos = 0
    while pos < len(s):
        m = _KV.search(s, pos)
        if m is None:
            break
        name, sep_end = m.group("name"), m.end("sep")
        out.append(s[pos:sep_end])
        v = _VAL.match(s, sep_end) if is_secret_name(name) else None
        if v is None:
            pos = sep_end  # the value is scanned too: "--set=api_key=x"
        elif _line_name(name) and ":" in m.group("sep") and v.group(0)[:1] not in ("\"", "'"):
            out.append(MASK)  # "Authorization: Bearer x", "Cookie: a=1; b=2": the whole value
            pos = max(_line_end(s, m), v.end())
        else:
            out.append(_mask_value(v.group(0)))
            pos = v.end()
    out.append(s[pos:])
    return "".join(out)


def _flag_space(m: re.Match[str]) -> str:
    name, val = m.group("name"), m.group("val")
    if name in ("u", "user", "proxy-user") and ":" in val:  # curl -u user:password
        return m.group(1) + m.group("sp") + val.split(":", 1)[0] + ":" + MASK
    if is_secret_name(name):
        return m.group(1) + m.group("sp") + _mask_value(val)
    return m.group(0)


def _entropy_sub(s: str) -> str:
    def rep(m: re.Match[str]) -> str:
        if _DIGEST.search(s[max(0, m.start() - 7) : m.start()]):
            return m.group(0)  # "sha256:<hex>" is a content digest, not a credential
        return MASK if looks_secret(m.group(0)) else m.group(0)

    return _RUN.sub(rep, s)


def _once(s: str) -> str:
    s = _URL_CRED.sub(lambda m: m.group(1) + MASK + m.group(3), s)
    s = _sub_kv(s)
    s = _FLAG_SPACE.sub(_flag_space, s)
    s = _BEARER.sub(lambda m: m.group(1) + MASK, s)
    s = _SHAPE.sub(MASK, s)
    return _entropy_sub(s)


def redact_text(s: str) -> str:
    """Mask credentials in free text (a header value, a body, a log line, one argument)."""
    try:
        for _ in range(4):  # to a fixed point: masking one value can expose the next rule's context
            nxt = _once(s)
            if nxt == s:
                return s
            s = nxt
        return s
    except Exception:  # noqa: BLE001 - a redactor that raises would leak the unredacted line upstream
        return MASK


def redact_id(s: str) -> str:
    """Mask credentials of a known shape (provider key prefixes, JWTs) in an identifier a server
    chose (an LLM answer's response id). The entropy rule is not applied: every real response id
    (``chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG``) is a random token, and would be masked whole."""
    try:
        return _SHAPE.sub(MASK, s)
    except Exception:  # noqa: BLE001 - as redact_text
        return MASK


# -- argv -------------------------------------------------------------------------------------------
_FLAG = re.compile(r"^--?(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)(?:=(?P<val>.*))?$", re.DOTALL)
# A credential name as its own argument takes the following argument as its value:
# "aws configure set aws_secret_access_key V", "git config user.password V", "client_secret: V",
# "-H x-api-key: V", "-H 'Authorization: Bearer' V", "Authorization:" "Bearer" "V". The name may end with
# ":" or "=" and an auth scheme; a header flag may sit in front of it (-H, --header, "--header=").
# A bare single word with no separator is a command, not a name ("gh auth login", "kubectl create
# secret generic"), unless it follows a header flag.
_NAME_ARG = re.compile(r"(?P<hflag>-H|--header=)?(?P<name>_?[A-Za-z][A-Za-z0-9_.\-]{0,127})[ \t]*"
                       r"(?:(?P<sep>[:=])[ \t]*(?P<scheme>(?:bearer|basic|token|digest)[ \t]*)?)?", re.IGNORECASE)
_BARE = re.compile(r"_?[A-Za-z][A-Za-z0-9_.]*")
_SCHEME = frozenset({"bearer", "basic", "token", "digest"})
_HEADER_FLAGS = frozenset({"-H", "--header", "--headers"})
_USER_FLAGS = ("--user", "--proxy-user", "-U")  # curl/wget "user:password"
_SHORT_FLAG = re.compile(r"-[A-Za-z]")


def _is_flag(a: str) -> bool:
    """After a credential name, a flag is a flag, not the value: "--token --verbose", "x-api-key: -H"."""
    return a.startswith("--") or _SHORT_FLAG.fullmatch(a) is not None


def _names_next(a: str, after_header: bool) -> int:
    """If argument ``a`` is a credential name whose value is the next argument: 2 when the next may be
    an auth scheme word followed by the value ("Authorization:" "Bearer" "V"), 1 when the value is
    next, 0 when ``a`` is not such a name."""
    if len(a) > 160:
        return 0
    m = _NAME_ARG.fullmatch(a)
    if m is None:
        return 0
    name, sep = m.group("name"), m.group("sep")
    header = after_header or m.group("hflag") is not None
    if not (is_secret_name(name) or (header and name.lower() in SECRET_HEADERS)):
        return 0
    if sep is None and not header and not (_BARE.fullmatch(name) and len(_words(name)) > 1):
        return 0  # a single bare word is a command
    return 1 if m.group("scheme") else 2


def redact_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """Mask credentials in a command line, argument by argument; the same length comes back."""
    out: list[str] = []
    prog = argv[0].rsplit("/", 1)[-1] if argv else ""
    secret_next = 0  # 1: the next argument is a value; 2: the same, or an auth scheme then the value
    user_next = header_next = False
    for a in argv:
        try:
            after_header, header_next = header_next, False
            if secret_next:
                pending, secret_next = secret_next, 0
                if not _is_flag(a):
                    if pending == 2 and a.strip().lower() in _SCHEME:
                        out.append(a)  # "Authorization:" "Bearer" "V": the scheme is no secret, V is
                        secret_next = 1
                    else:
                        out.append(MASK)
                    continue
            if user_next:
                user_next = False
                if ":" in a:
                    out.append(a.split(":", 1)[0] + ":" + MASK)
                    continue
            m = _FLAG.match(a)
            if m and is_secret_name(m.group("name")):
                if not m.group("val"):  # "--api-key V"; "--api-key=" "V" and "-Hclient_secret=" "V" too
                    out.append(a)
                    secret_next = 2
                else:
                    out.append(a[: m.start("val")] + MASK)
                    if m.group("val").strip().lower() in _SCHEME:  # "--auth=Bearer" "V"
                        secret_next = 1
                continue
            if a in _USER_FLAGS or (a == "-u" and prog.startswith(("curl", "wget"))):
                user_next = True
            elif a in _HEADER_FLAGS:
                header_next = True
            elif out:
                secret_next = _names_next(a, after_header)
            out.append(redact_text(a))
        except Exception:  # noqa: BLE001 - never raise; never let the argument through unmasked
            out.append(MASK)
    return tuple(out)


# -- URLs -------------------------------------------------------------------------------------------
# Query parameters that carry a credential without a credential-like name (signed URLs, OAuth codes).
_URL_PARAMS = frozenset({"sig", "code", "x-amz-signature", "x-amz-credential", "x-amz-security-token"})


def redact_url(s: str) -> str:
    """Mask credentials in a request path or URL (``/v1/x?subscription-key=V&alt=sse``): the value of
    every query parameter with a credential name (``is_secret_name``: ``key``, ``x-api-key``,
    ``access-token``, ``auth_token``, ``subscription-key``...) or a signing one (``sig``,
    ``X-Amz-Signature``); ``user:pass@`` in the authority; and ``redact_text`` over each path segment
    and each parameter (key shapes, long random tokens). By segment, not over the whole: the entropy
    rule would take ``/openai/deployments/my-gpt4o/chat/completions`` for one random token."""
    try:
        s = _URL_CRED.sub(lambda m: m.group(1) + MASK + m.group(3), s)
        base, sep, query = s.partition("?")
        out = "/".join(map(redact_text, base.split("/")))
        if not sep:
            return out
        query, fsep, frag = query.partition("#")
        parts = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            n = name.replace("%2D", "-").replace("%2d", "-").replace("%5F", "_").replace("%5f", "_")
            if eq and (n.lower() in _URL_PARAMS or is_secret_name(n)):
                parts.append(name + "=" + MASK)
            else:
                parts.append(redact_text(item))
        return out + "?" + "&".join(parts) + fsep + (redact_text(frag) if frag else "")
    except Exception:  # noqa: BLE001 - never raise; never let the URL through unmasked
        return MASK


# -- headers ----------------------------------------------------------------------------------------
H = TypeVar("H", str, bytes)


def redact_headers(headers: Iterable[tuple[H, H]]) -> tuple[tuple[H, H], ...]:
    """Mask credential headers in a ``(name, value)`` list (str or bytes, as h11/hpack give them):
    the SECRET_HEADERS and any credential-named header lose their value; others go through
    ``redact_text``. Names and order are kept."""
    out: list[tuple[H, H]] = []
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        v = MASK if n.strip().lower() in SECRET_HEADERS or is_secret_name(n) else redact_text(v)
        # latin-1 round-trips every byte, and MASK is ASCII
        out.append((name, v.encode("latin-1") if isinstance(value, bytes) else v))
    return tuple(out)
