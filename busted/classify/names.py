"""Host names as busted compares them: one normaliser for the policy, its kernel compilation, the
classifier and events (docs/policy.md, "Evidence and normalisation").

``normalize_name``: surrounding whitespace dropped, trailing dots dropped (``api.x.com.`` is the
fully qualified spelling of ``api.x.com``), ASCII lower case, and a non-ASCII name turned into its
IDNA A-label form (``bücher.de`` -> ``xn--bcher-kva.de``), which is what DNS and TLS carry on the
wire. The kernel does the same to what it reads (the SNI, DNS names): lower case, trailing dot
dropped; a wire name with non-ASCII bytes is not a valid host name there and is judged as
unreadable (busted/ebpf/policy_enforce.c).
"""

from __future__ import annotations

import functools

__all__ = ["normalize_name"]


@functools.lru_cache(maxsize=8192)
def normalize_name(name: str) -> str:
    """The canonical form of a host name (see the module docstring). Never raises."""
    n = name.strip().rstrip(".")
    if n.isascii():
        return n.lower()
    labels = []
    for label in n.split("."):
        if label.isascii():
            labels.append(label.lower())
            continue
        try:
            labels.append(label.encode("idna").decode("ascii").lower())
        except UnicodeError:  # not a valid IDNA label: kept, lower-cased (it matches no ASCII rule)
            labels.append(label.lower())
    return ".".join(labels)
