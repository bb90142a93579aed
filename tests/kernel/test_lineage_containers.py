"""Real BPF: a client placed in cgroups named as docker, containerd (kubepods, with a pod UID) and
podman name reports the container id, runtime and pod UID. The cgroups are created under the
cgroup v2 mount, the client moves itself in before exec, and they are removed afterwards."""

import os
import subprocess
import uuid

import pytest
from test_lineage import _curl_flow, server  # noqa: F401  (fixture)

import busted
from busted.host.cgroups import cgroup2_mount

CID = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff"


def _cases():
    uid = str(uuid.UUID("5d6c7b8a-1f2e-4d3c-9b8a-7f6e5d4c3b2a"))
    return [
        (f"bst-test/docker/{CID}", "docker", CID, None),
        (f"bst-test/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
         f"cri-containerd-{CID}.scope", "containerd", CID, uid),
        (f"bst-test/machine.slice/libpod-{CID}.scope", "podman", CID, None),
    ]


@pytest.fixture
def v2root():
    root = cgroup2_mount()
    if root is None:
        pytest.fail("no cgroup v2 mount on this machine")
    made: list[str] = []
    yield root, made
    for d in sorted(made, key=len, reverse=True):  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass


@pytest.mark.parametrize(("rel", "runtime", "cid", "pod"), _cases(), ids=["docker", "containerd-kubepods", "podman"])
def test_client_in_container_cgroup(v2root, server, rel, runtime, cid, pod):  # noqa: F811
    root, made = v2root
    path = root
    for part in rel.split("/"):
        path = os.path.join(path, part)
        if not os.path.isdir(path):
            os.mkdir(path)
            made.append(path)
    procs = os.path.join(path, "cgroup.procs")

    def enter():  # in the child, before exec: children inherit the cgroup
        with open(procs, "w") as f:
            f.write("0")

    with busted.Monitor(port=server, classify=False, preexisting=False) as mon:
        p = subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{server}/"], preexec_fn=enter,
                           timeout=30, check=True)
        assert p.returncode == 0
        opened, closed = _curl_flow(mon, server)
    for ev in (opened, closed):
        assert (ev.container_id, ev.container_runtime, ev.pod_uid) == (cid, runtime, pod), ev
        assert ev.cgroup_id == os.stat(path).st_ino
        # The container's first process is the last one in the chain: its parent is outside.
        assert len(ev.ancestry) == 1 and ev.ancestry[0].exe == "/usr/bin/curl"
    d = opened.to_dict()
    assert (d["container_id"], d["container_runtime"], d["pod_uid"]) == (cid, runtime, pod)
