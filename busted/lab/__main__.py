"""``python -m busted.lab``: start a lab, print its hosts and example commands, wait for Ctrl-C.

Options: ``--seconds N`` (default 600) bounds how long it runs; ``--traffic R`` runs the demo
clients R times right after start (and prints their results); ``--json`` prints the lab
description as JSON instead of text.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from busted.errors import BustedError
from busted.lab.core import Lab
from busted.lab.traffic import demo_traffic


def describe(lab: Lab) -> dict:
    return {
        "client_ns": lab.client_ns,
        "server_ns": lab.server_ns,
        "v4_net": lab.v4_net,
        "v6_net": lab.v6_net,
        "dns": [lab.dns_addr, lab.dns_addr6],
        "ca": str(lab.ca_path),
        "bare_ip": [lab.bare_ip, lab.bare_ip6],
        "bare_cidr": [lab.bare_cidr, lab.bare_cidr6],
        "hosts": {n: {"ipv4": h.ipv4, "ipv6": h.ipv6, "kind": h.kind, "cname_chain": list(h.cname_chain)}
                  for n, h in lab.hosts.items()},
        "server_pids": lab.server_pids,
    }


def text(lab: Lab) -> str:
    d = describe(lab)
    ca = d["ca"]
    cli = f"ip netns exec {lab.client_ns}"
    lines = [
        f"busted lab up: client netns {lab.client_ns}, servers netns {lab.server_ns}",
        f"  networks {lab.v4_net}  {lab.v6_net}",
        f"  DNS      {lab.dns_addr}  {lab.dns_addr6}  (the client netns' resolv.conf)",
        f"  CA       {ca}",
        f"  bare IP  {lab.bare_ip} in {lab.bare_cidr}, {lab.bare_ip6} in {lab.bare_cidr6}",
        "  hosts:",
    ]
    for name, h in lab.hosts.items():
        chain = f"  (CNAME {' -> '.join(h.cname_chain)})" if h.cname_chain else ""
        lines.append(f"    {name:36} {h.ipv4:16} {h.ipv6:28} {h.kind}{chain}")
    lines += [
        "  try:",
        f"    {cli} curl --cacert {ca} https://api.openai.com/v1/chat/completions -d '{{}}'",
        f"    {cli} curl --cacert {ca} https://x.openai.azure.com/",
        f"    {cli} curl http://ollama.lab.test:11434/api/tags",
        f"    {cli} getent ahosts api.anthropic.com",
        f"    dig @{lab.dns_addr} x.openai.azure.com",
        f"    {cli} env SSL_CERT_FILE={ca} python3 -c 'import urllib.request as u; "
        "print(u.urlopen(\"https://api.anthropic.com/\").read())'",
        # the official SDK (the lab extra), with a lab key: the fake provider answers with usage
        f"    {cli} env SSL_CERT_FILE={ca} OPENAI_API_KEY=sk-lab {sys.executable} -c 'import openai; "
        "print(openai.OpenAI(base_url=\"https://api.openai.com/v1\").chat.completions.create("
        "model=\"gpt-4o-mini\", messages=[{\"role\": \"user\", \"content\": \"hi\"}]).usage)'",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m busted.lab",
                                 description="Run the busted network lab.")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long (default 600)")
    ap.add_argument("--traffic", type=int, default=0, metavar="ROUNDS", help="run the demo clients")
    ap.add_argument("--json", action="store_true", help="print the lab description as JSON")
    ap.add_argument("--prefix", default="bl-")
    args = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Lab(prefix=args.prefix, max_seconds=args.seconds + 60) as lab:
            print(json.dumps(describe(lab), indent=1) if args.json else text(lab), flush=True)
            if args.traffic:
                for r in demo_traffic(lab, rounds=args.traffic):
                    status = "skipped: " + r.skipped if r.skipped else f"rc={r.returncode}"
                    print(f"  [{r.round}] {r.name:20} pid={r.pid} {status} {r.seconds:.2f}s", flush=True)
            if not stop.is_set():
                print(f"running for up to {args.seconds:.0f}s; Ctrl-C to stop", flush=True)
                stop.wait(max(0.0, args.seconds))
    except BustedError as exc:  # LabError, or MissingDependency when the lab extra is absent
        print(f"busted lab: {exc}", file=sys.stderr)
        return 1
    print("lab torn down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
