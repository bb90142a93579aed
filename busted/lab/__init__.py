"""A network lab for busted: real namespaces, a lab DNS server and fake LLM providers over TLS.

    from busted.lab import Lab
    with Lab() as lab:
        r = lab.run_client(["curl", "-s", "https://api.openai.com/v1/chat/completions", "-d", "{}"])

Importing this package needs neither root nor ``cryptography``; starting a ``Lab`` needs root.
See docs/lab.md.
"""

from busted.lab.core import Lab, LabError, LabHost
from busted.lab.traffic import ClientResult, demo_traffic

__all__ = ["ClientResult", "Lab", "LabError", "LabHost", "demo_traffic"]
