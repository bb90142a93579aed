"""Which container, pod or systemd unit a cgroup v2 path belongs to. Pure: a path in, a record out.

A process's cgroup (``/proc/<pid>/cgroup`` line ``0::<path>``, or the path of the directory
whose inode is the BPF ``cgroup id``) is named by whoever created it: container runtimes use
fixed, documented shapes. The table below lists them; the deepest component that matches wins
(a container's cgroup sits under its pod's, which sits under ``kubepods``).

    /docker/<id>                                          docker, cgroupfs driver
    /system.slice/docker-<id>.scope                       docker, systemd driver
    /kubepods/burstable/pod<uid>/<id>                     kubernetes, cgroupfs driver
    /kubepods.slice/kubepods-besteffort.slice/
        kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
    /machine.slice/libpod-<id>.scope[/container]          podman (rootful), systemd manager
    /user.slice/.../user@1000.service/.../libpod-<id>.scope  podman (rootless)
    /libpod_parent/libpod-<id>                            podman, cgroupfs manager
    /system.slice/crio-<id>.scope, crio-conmon-<id>.scope cri-o (container, its monitor)
    /lxc.payload.<name>                                   lxc / lxd
    /machine.slice/systemd-nspawn@<name>.service          systemd-nspawn
    /user.slice/user-1000.slice/session-3.scope           a systemd unit (not a container)

Everything here is attacker-influenced (anyone may create cgroups they own with any name), so the
result is a label, not a proof; nothing raises on odd input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["ContainerInfo", "container_of", "cgroup_path_from_proc"]

_HEX_ID = r"[0-9a-f]{12,64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"

# (regex on one path component, runtime). The id is group "id". Order matters only within one
# component (more specific first).
_CONTAINER_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), rt) for p, rt in (
        (rf"^cri-containerd-(?P<id>{_HEX_ID})\.scope$", "containerd"),
        (rf"^crio-conmon-(?P<id>{_HEX_ID})\.scope$", "cri-o"),
        (rf"^crio-(?P<id>{_HEX_ID})\.scope$", "cri-o"),
        (rf"^docker-(?P<id>{_HEX_ID})\.scope$", "docker"),
        (rf"^libpod-conmon-(?P<id>{_HEX_ID})\.scope$", "podman"),
        (rf"^libpod-(?P<id>{_HEX_ID})(?:\.scope)?$", "podman"),
        (rf"^nerdctl-(?P<id>{_HEX_ID})\.scope$", "containerd"),
        (r"^lxc\.payload\.(?P<id>[^/]{1,64})$", "lxc"),
        (r"^systemd-nspawn@(?P<id>[^/]{1,64})\.service$", "systemd-nspawn"),
    )
)
_POD = re.compile(rf"^(?:kubelet-)?kubepods(?:-(?P<qos1>burstable|besteffort))?-pod(?P<uid1>{_UID})\.slice$"
                  rf"|^pod(?P<uid2>{_UID})$")
_QOS_DIR = re.compile(r"^(?:kubelet-)?kubepods-(?P<qos>burstable|besteffort)\.slice$|^(?P<qos2>burstable|besteffort)$")
_BARE_ID = re.compile(rf"^(?P<id>{_HEX_ID})$")
_UNIT = re.compile(r"^[^/]{1,200}\.(scope|service)$")


@dataclass(frozen=True)
class ContainerInfo:
    """What a cgroup path says. ``runtime`` is one of docker, containerd, cri-o, podman, lxc,
    systemd-nspawn, kubernetes (a pod whose runtime the path does not name), systemd (a unit,
    not a container) or None. ``pod_uid``/``qos`` are set iff the path is under ``kubepods``
    (qos: guaranteed, burstable or besteffort). ``monitor`` is True for a runtime's helper
    process next to the container (conmon), not the container itself. ``unit`` is the deepest
    systemd unit (``*.scope``/``*.service``) on the path."""

    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    qos: str | None = None
    unit: str | None = None
    monitor: bool = False

    @property
    def in_container(self) -> bool:
        return self.container_id is not None


_NONE = ContainerInfo()


@lru_cache(maxsize=4096)  # a host has few cgroups and this runs per process
def container_of(path: str | None) -> ContainerInfo:
    """The container/pod/unit a cgroup v2 path names (``_NONE``-like empty record when none)."""
    if not path or not isinstance(path, str) or len(path) > 4096:
        return _NONE
    parts = [p for p in path.split("/") if p]
    runtime = cid = pod = qos = unit = None
    monitor = False
    kube = any(p.startswith(("kubepods", "kubelet-kubepods")) for p in parts)
    for i, comp in enumerate(parts):
        m = _POD.match(comp) if kube else None
        if m:
            pod = (m.group("uid1") or m.group("uid2")).replace("_", "-")
            qos = m.group("qos1") or qos or "guaranteed"
            continue
        mq = _QOS_DIR.match(comp)
        if mq and kube:
            qos = mq.group("qos") or mq.group("qos2")
            continue
        if _UNIT.match(comp):
            unit = comp
        for rx, rt in _CONTAINER_RULES:
            m = rx.match(comp)
            if m:
                runtime, cid = rt, m.group("id")
                monitor = "conmon" in comp
                break
        else:
            if (parts[i - 1] == "docker" if i else False) and _BARE_ID.match(comp):
                runtime, cid, monitor = "docker", comp, False
            elif pod is not None and _BARE_ID.match(comp):
                # cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>; the runtime is not in the name.
                runtime, cid, monitor = "kubernetes", comp, False
            elif i and parts[i - 1] == "libpod_parent" and _BARE_ID.match(comp):
                runtime, cid, monitor = "podman", comp, False
    if pod is not None and runtime is None:
        runtime = "kubernetes"
    if runtime is None and unit is not None:
        runtime = "systemd"
    if runtime is None and pod is None and unit is None:
        return _NONE
    return ContainerInfo(runtime=runtime, container_id=cid, pod_uid=pod, qos=qos if pod else None,
                         unit=unit, monitor=monitor)


def cgroup_path_from_proc(text: str) -> str | None:
    """The cgroup v2 path from the text of ``/proc/<pid>/cgroup`` (its ``0::`` line), or None."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None
