"""Address plan, namespaces and veths of a lab, and the clean-up of crashed runs.

Topology (``<id>`` is 6 random hex digits, ``N``/``R`` are chosen per lab)::

          root netns                                    (no forwarding, no NAT touched)
     bl-<id>-s 10.231.N.1/30  ────veth────  up0 10.231.N.2/30      bl-srv-<id>
     bl-<id>-c 10.231.N.5/30  ──┐                lo: 10.231.N.64/26 host IPs (/32 each)
                                │                cli0 10.231.N.10/30
                              veth                    │
                                │                    veth (direct client <-> servers link)
                   up0 10.231.N.6/30  bl-cli-<id>     │
                   srv0 10.231.N.9/30 ────────────────┘

The client reaches the provider IPs over the *direct* veth (its only route to them; it has no
default route, so nothing it sends can leave the lab), the root netns reaches them over its own
veth. Neither path forwards through the root netns, so no ``forwarding`` sysctl is changed and the
host's IPv6 router/RA behaviour is untouched. IPv6 mirrors IPv4 in ``fd6c:6162:R::/48``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from busted.errors import LabError

STATE_DIR = Path("/run/busted-lab")
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
V4_SUPERNET = ipaddress.ip_network("10.231.0.0/16")
V6_PREFIX = "fd6c:6162"  # fd + "lab" in ASCII (6c 61 62): a ULA global ID, then 16 random bits
IFA_F_NODAD = 0x02  # no duplicate address detection: addresses are usable at once


@dataclass
class Plan:
    """Every name and address of one lab; also what its state file records."""

    prefix: str
    lab_id: str
    v4_net: str  # 10.231.N.0/24
    v6_net: str  # fd6c:6162:R::/48
    owner_pid: int = 0
    owner_start: str = ""
    tmpdir: str = ""
    children: list[int] = field(default_factory=list)

    # names -------------------------------------------------------------------------------
    @property
    def server_ns(self) -> str:
        return f"{self.prefix}srv-{self.lab_id}"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}cli-{self.lab_id}"

    @property
    def root_veth_srv(self) -> str:
        return f"{self.prefix}{self.lab_id}-s"

    @property
    def root_veth_cli(self) -> str:
        return f"{self.prefix}{self.lab_id}-c"

    @property
    def root_veth_direct(self) -> str:  # only briefly in the root netns, renamed srv0 in the client's
        return f"{self.prefix}{self.lab_id}-x"

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}{self.lab_id}.json"

    # addresses ---------------------------------------------------------------------------
    def v4(self, last: int) -> str:
        return str(ipaddress.ip_network(self.v4_net)[last])

    def v6(self, subnet: int, iid: str) -> str:
        base = ipaddress.ip_network(self.v6_net).network_address
        return str(ipaddress.ip_address(int(base) + (subnet << 64) + int(iid, 16)))

    @property
    def hosts_v4(self) -> str:
        return f"{self.v4(64)}/26"

    @property
    def hosts_v6(self) -> str:
        return f"{self.v6(0x100, '0')}/64"

    def host_v4(self, last: int) -> str:
        assert 64 < last < 127
        return self.v4(last)

    def host_v6(self, last: int) -> str:
        # IPv4 10.231.N.65 <-> fd6c:6162:R:100::65 (the same digits, read as hex)
        return self.v6(0x100, str(last))

    def save(self) -> None:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.state_file)


# ----------------------------------------------------------------------------------------------
def proc_start_time(pid: int) -> str:
    """The kernel's start time of *pid* (field 22 of /proc/pid/stat), '' if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def owner_alive(plan: Plan) -> bool:
    return plan.owner_pid > 0 and proc_start_time(plan.owner_pid) == plan.owner_start


def choose_networks(prefix: str, ipr, rng: random.Random | None = None) -> tuple[str, str]:
    """Pick a free 10.231.N.0/24 and fd6c:6162:R::/48: overlapping no route or address of the host."""
    rng = rng or random.SystemRandom()
    taken4: list = []
    taken6: list = []
    for fam, taken in ((2, taken4), (10, taken6)):
        for r in ipr.route("dump", family=fam):
            if r["dst_len"] == 0:
                continue  # a default route overlaps everything and says nothing
            dst = r.get("dst")
            if dst:
                with contextlib.suppress(ValueError):
                    taken.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
        for a in ipr.addr("dump", family=fam):
            addr = a.get("IFA_ADDRESS")
            if addr:
                with contextlib.suppress(ValueError):
                    taken.append(ipaddress.ip_network(f"{addr}/{a['prefixlen']}", strict=False))
    for plan in read_states(prefix):  # also nets of labs being built right now
        taken4.append(ipaddress.ip_network(plan.v4_net))
        taken6.append(ipaddress.ip_network(plan.v6_net))
    v4 = v6 = None
    for _ in range(256):
        cand = ipaddress.ip_network(f"10.231.{rng.randrange(1, 255)}.0/24")
        if not any(cand.overlaps(t) for t in taken4):
            v4 = cand
            break
    for _ in range(256):
        r = rng.randrange(1, 0xFFFF)
        cand6 = ipaddress.ip_network(f"{V6_PREFIX}:{r:x}::/48")
        if not any(cand6.overlaps(t) for t in taken6):
            v6 = cand6
            break
    if v4 is None or v6 is None:
        raise LabError("no free 10.231.x.0/24 or fd6c:6162:x::/48 for a lab (256 tries each); routes "
                       "or other labs hold them all: see `ip route`, `ip netns list`")
    return str(v4), str(v6)


def read_states(prefix: str) -> list[Plan]:
    out: list[Plan] = []
    if not STATE_DIR.is_dir():
        return out
    for p in sorted(STATE_DIR.glob(f"{prefix}*.json")):
        try:
            out.append(Plan(**json.loads(p.read_text())))
        except (OSError, ValueError, TypeError):
            with contextlib.suppress(OSError):
                p.unlink()
    return out


# ----------------------------------------------------------------------------------------------
def build(plan: Plan) -> None:
    """Create both namespaces, the three veth pairs, addresses and routes described in the module doc.

    All veths are created from the root netns and moved with namespace fds this function opens
    and closes itself (pyroute2 0.9.7 opening ``/run/netns/<name>`` by name from inside a
    ``NetNS`` proved flaky here after a netns removal: the peer went missing or elsewhere).
    """
    from pyroute2 import IPRoute, NetNS, netns

    netns.create(plan.server_ns)
    netns.create(plan.client_ns)
    fd_srv = os.open(NETNS_RUN / plan.server_ns, os.O_RDONLY | os.O_CLOEXEC)
    fd_cli = os.open(NETNS_RUN / plan.client_ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=plan.root_veth_srv, kind="veth", peer={"ifname": "up0", "net_ns_fd": fd_srv})
            ipr.link("add", ifname=plan.root_veth_cli, kind="veth", peer={"ifname": "up0", "net_ns_fd": fd_cli})
            # the direct client <-> servers link: created here, one end moved to each namespace
            ipr.link("add", ifname=plan.root_veth_direct, kind="veth",
                     peer={"ifname": "cli0", "net_ns_fd": fd_srv})
            ipr.link("set", index=_index(ipr, plan.root_veth_direct, "root"), net_ns_fd=fd_cli)
            for ifname, v4, v6 in (
                (plan.root_veth_srv, plan.v4(1), plan.v6(0, "1")),
                (plan.root_veth_cli, plan.v4(5), plan.v6(1, "1")),
            ):
                idx = _index(ipr, ifname, "root")
                ipr.addr("add", index=idx, address=v4, prefixlen=30)
                ipr.addr("add", index=idx, address=v6, prefixlen=64, flags=IFA_F_NODAD)
                ipr.link("set", index=idx, state="up")
    finally:
        os.close(fd_srv)
        os.close(fd_cli)
    with NetNS(plan.server_ns) as ns:
        ns.link("set", index=_index(ns, "lo", plan.server_ns), state="up")
        for ifname, v4, v6 in (("up0", plan.v4(2), plan.v6(0, "2")), ("cli0", plan.v4(10), plan.v6(2, "2"))):
            idx = _index(ns, ifname, plan.server_ns)
            ns.addr("add", index=idx, address=v4, prefixlen=30)
            ns.addr("add", index=idx, address=v6, prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=idx, state="up")
    with NetNS(plan.client_ns) as ns:
        ns.link("set", index=_index(ns, plan.root_veth_direct, plan.client_ns), ifname="srv0")
        ns.link("set", index=_index(ns, "lo", plan.client_ns), state="up")
        for ifname, v4, v6 in (("up0", plan.v4(6), plan.v6(1, "2")), ("srv0", plan.v4(9), plan.v6(2, "1"))):
            idx = _index(ns, ifname, plan.client_ns)
            ns.addr("add", index=idx, address=v4, prefixlen=30)
            ns.addr("add", index=idx, address=v6, prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=idx, state="up")
        ns.route("add", dst=plan.hosts_v4, gateway=plan.v4(10))
        ns.route("add", dst=plan.hosts_v6, gateway=plan.v6(2, "2"))
    with IPRoute() as ipr:
        ipr.route("add", dst=plan.hosts_v4, gateway=plan.v4(2))
        ipr.route("add", dst=plan.hosts_v6, gateway=plan.v6(0, "2"))


def _index(ipr, ifname: str, where: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} missing in {where} right after creating it "
                       "(was it removed concurrently? start the lab again)")
    return found[0]


def add_server_address(plan: Plan, v4: str | None, v6: str | None) -> None:
    """Put /32 and /128 addresses on the servers netns' lo; route them if outside the hosts block."""
    from pyroute2 import IPRoute, NetNS

    with NetNS(plan.server_ns) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        if v4:
            ns.addr("add", index=lo, address=v4, prefixlen=32)
        if v6:
            ns.addr("add", index=lo, address=v6, prefixlen=128)
    extra4 = v4 and ipaddress.ip_address(v4) not in ipaddress.ip_network(plan.hosts_v4)
    extra6 = v6 and ipaddress.ip_address(v6) not in ipaddress.ip_network(plan.hosts_v6)
    if extra4 or extra6:
        with NetNS(plan.client_ns) as ns:
            if extra4:
                ns.route("add", dst=f"{v4}/32", gateway=plan.v4(10))
            if extra6:
                ns.route("add", dst=f"{v6}/128", gateway=plan.v6(2, "2"))
        with IPRoute() as ipr:
            if extra4:
                ipr.route("add", dst=f"{v4}/32", gateway=plan.v4(2))
            if extra6:
                ipr.route("add", dst=f"{v6}/128", gateway=plan.v6(0, "2"))


# ----------------------------------------------------------------------------------------------
def pids_in_netns(name: str) -> list[int]:
    """Pids of processes whose network namespace is the named one (bounded scan of /proc)."""
    try:
        ino = os.stat(NETNS_RUN / name).st_ino
    except OSError:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc")[:1_000_000]:
        if not entry.isdigit() or int(entry) == me:
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                out.append(int(entry))
    return out


def kill_pids(pids: list[int], grace: float = 2.0) -> None:
    """SIGTERM, wait up to *grace* seconds, then SIGKILL whatever is left."""
    live = [p for p in pids if p > 0]
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if _alive(p)]
        if live:
            time.sleep(0.05)
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False  # our own child: reaped now
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie that is not ours counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def destroy(plan: Plan) -> list[str]:
    """Remove everything *plan* names. Idempotent; returns what went wrong (empty if nothing)."""
    errors: list[str] = []
    from pyroute2 import IPRoute, netns

    pids = list(plan.children)
    for ns in (plan.client_ns, plan.server_ns):
        pids += pids_in_netns(ns)
    # children of a previous run: only kill them if they still look like ours
    ours = [p for p in dict.fromkeys(pids) if _looks_like_lab_process(p, plan)]
    kill_pids(ours)
    existing = set(netns.listnetns())
    for ns in (plan.client_ns, plan.server_ns):
        if ns in existing:
            try:
                netns.remove(ns)
            except Exception as exc:  # noqa: BLE001 - collected and reported
                errors.append(f"netns {ns}: {exc}")
        etc = NETNS_ETC / ns
        if etc.exists():
            shutil.rmtree(etc, ignore_errors=True)
    with contextlib.suppress(OSError):
        NETNS_ETC.rmdir()  # only if empty
    try:
        with IPRoute() as ipr:
            for ifname in (plan.root_veth_srv, plan.root_veth_cli, plan.root_veth_direct):
                for idx in ipr.link_lookup(ifname=ifname):
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=idx)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"veth: {exc}")
    if plan.tmpdir and Path(plan.tmpdir).name.startswith("busted-lab-"):
        shutil.rmtree(plan.tmpdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        plan.state_file.unlink()
    return errors


def _looks_like_lab_process(pid: int, plan: Plan) -> bool:
    if pid in plan.children:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"busted.lab" in cmd or b"netns" in cmd
    return True  # found inside one of the lab's namespaces: it belongs to the lab


def cleanup_stale(prefix: str) -> list[str]:
    """Destroy leftovers of crashed labs with *prefix*: state files whose owner is dead, and
    namespaces, root veths and /etc/netns dirs that no live lab claims."""
    from pyroute2 import IPRoute, netns

    removed: list[str] = []
    live: list[Plan] = []
    for plan in read_states(prefix):
        if owner_alive(plan):
            live.append(plan)
        else:
            destroy(plan)
            removed.append(f"state {plan.prefix}{plan.lab_id}")
    claimed_ns = {n for p in live for n in (p.server_ns, p.client_ns)}
    claimed_if = {n for p in live for n in (p.root_veth_srv, p.root_veth_cli, p.root_veth_direct)}
    for ns in netns.listnetns():
        if ns.startswith(prefix) and ns not in claimed_ns:
            kill_pids(pids_in_netns(ns))
            with contextlib.suppress(Exception):
                netns.remove(ns)
            removed.append(f"netns {ns}")
    with IPRoute() as ipr:
        for link in ipr.link("dump"):
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith(prefix) and name not in claimed_if:
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info else None
                if kind == "veth":
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=link["index"])
                    removed.append(f"veth {name}")
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if d.name.startswith(prefix) and d.name not in claimed_ns:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"etc {d}")
    return removed
