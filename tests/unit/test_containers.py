"""cgroup v2 path -> container / pod / unit, on path shapes seen on real hosts."""

import pytest

from busted.classify.containers import ContainerInfo, cgroup_path_from_proc, container_of

CID = "3f1c0a9e2b7d4c5e8f6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"
UID = "6f5bd2a4-9c3e-4d1a-8b7f-2e6c9d0a1b3c"
UID_ = UID.replace("-", "_")

CASES = [
    # docker
    (f"/docker/{CID}", ContainerInfo("docker", CID)),
    (f"/system.slice/docker-{CID}.scope", ContainerInfo("docker", CID, unit=f"docker-{CID}.scope")),
    # kubernetes, cgroupfs driver (runtime not named in the path)
    (f"/kubepods/burstable/pod{UID}/{CID}", ContainerInfo("kubernetes", CID, UID, "burstable")),
    (f"/kubepods/besteffort/pod{UID}/{CID}", ContainerInfo("kubernetes", CID, UID, "besteffort")),
    (f"/kubepods/pod{UID}/{CID}", ContainerInfo("kubernetes", CID, UID, "guaranteed")),
    (f"/kubepods/burstable/pod{UID}", ContainerInfo("kubernetes", None, UID, "burstable")),
    # kubernetes, systemd driver: containerd, cri-o, dockershim
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     ContainerInfo("containerd", CID, UID, "burstable", unit=f"cri-containerd-{CID}.scope")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     ContainerInfo("cri-o", CID, UID, "besteffort", unit=f"crio-{CID}.scope")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope",
     ContainerInfo("docker", CID, UID, "guaranteed", unit=f"docker-{CID}.scope")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     ContainerInfo("cri-o", CID, UID, "burstable", unit=f"crio-conmon-{CID}.scope", monitor=True)),
    # kind / nested kubelet
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     ContainerInfo("containerd", CID, UID, "besteffort", unit=f"cri-containerd-{CID}.scope")),
    # podman
    (f"/machine.slice/libpod-{CID}.scope", ContainerInfo("podman", CID, unit=f"libpod-{CID}.scope")),
    (f"/machine.slice/libpod-{CID}.scope/container", ContainerInfo("podman", CID, unit=f"libpod-{CID}.scope")),
    (f"/machine.slice/libpod-conmon-{CID}.scope",
     ContainerInfo("podman", CID, unit=f"libpod-conmon-{CID}.scope", monitor=True)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
     ContainerInfo("podman", CID, unit=f"libpod-{CID}.scope")),
    (f"/libpod_parent/libpod-{CID}", ContainerInfo("podman", CID)),
    # nerdctl, lxc, nspawn
    (f"/system.slice/nerdctl-{CID}.scope", ContainerInfo("containerd", CID, unit=f"nerdctl-{CID}.scope")),
    ("/lxc.payload.web1", ContainerInfo("lxc", "web1")),
    ("/machine.slice/systemd-nspawn@debian.service",
     ContainerInfo("systemd-nspawn", "debian", unit="systemd-nspawn@debian.service")),
    # systemd units that are not containers
    ("/user.slice/user-1000.slice/session-3.scope", ContainerInfo("systemd", unit="session-3.scope")),
    ("/system.slice/cron.service", ContainerInfo("systemd", unit="cron.service")),
    # nothing
    ("/", ContainerInfo()),
    ("", ContainerInfo()),
    (None, ContainerInfo()),
    ("/mygroup/sub", ContainerInfo()),
    # lookalikes that are not what they seem
    (f"/docker/{CID}xyz", ContainerInfo()),
    (f"/pod{UID}/{CID}", ContainerInfo()),  # a pod-like name outside kubepods is not a pod
    ("/docker/not-hex", ContainerInfo()),
]


@pytest.mark.parametrize(("path", "want"), CASES, ids=[str(c[0])[:70] for c in CASES])
def test_container_of(path, want):
    assert container_of(path) == want


def test_short_docker_id_and_in_container():
    info = container_of("/docker/0123456789ab")
    assert info.container_id == "0123456789ab" and info.in_container
    assert not container_of("/system.slice/cron.service").in_container


def test_garbage_never_raises():
    for junk in ("/" * 5000, "\x00/docker/" + CID, "/kubepods/pod/", "kubepods-pod.slice", "//..//"):
        assert isinstance(container_of(junk), ContainerInfo)


def test_proc_cgroup_text():
    text = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/init.scope\n0::/docker/" + CID + "\n"
    assert cgroup_path_from_proc(text) == "/docker/" + CID
    assert cgroup_path_from_proc("0::/\n") == "/"
    assert cgroup_path_from_proc("3:memory:/x\n") is None
