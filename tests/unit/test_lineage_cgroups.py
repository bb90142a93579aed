"""cgroup id -> path from a cgroup v2 tree, and the mount / /proc readers (on temp files)."""

import os

from busted.host.cgroups import CgroupPaths, cgroup2_mount, proc_cgroup_path


def test_ids_are_directory_inodes(tmp_path):
    cid = "ab" * 32
    d = tmp_path / "docker" / cid
    d.mkdir(parents=True)
    paths = CgroupPaths(str(tmp_path), rewalk_s=0)
    assert paths.path(os.stat(d).st_ino) == f"/docker/{cid}"
    assert paths.path(os.stat(tmp_path).st_ino) == "/"
    # A cgroup made later is found by walking again.
    late = tmp_path / "machine.slice"
    late.mkdir()
    assert paths.path(os.stat(late).st_ino) == "/machine.slice"
    assert paths.path(0) is None and paths.path(123456789) is None


def test_walks_are_rate_limited(tmp_path):
    paths = CgroupPaths(str(tmp_path), rewalk_s=3600)
    assert paths.path(987654321) is None
    assert paths.path(987654322) is None
    assert paths.walks == 1  # a storm of unknown ids is one walk


def test_missing_tree_means_no_paths(tmp_path):
    assert CgroupPaths(str(tmp_path / "absent"), rewalk_s=0).path(5) is None


def test_cgroup2_mount_from_mountinfo(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "25 1 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n"
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert cgroup2_mount(str(mi)) == "/sys/fs/cgroup/unified"
    mi.write_text("25 1 0:23 / /sys/fs/cgroup rw - cgroup cgroup rw,cpu\n")
    assert cgroup2_mount(str(mi)) is None
    assert cgroup2_mount(str(tmp_path / "nope")) is None


def test_proc_cgroup_path(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("3:cpu:/x\n0::/system.slice/docker-" + "cd" * 32 + ".scope\n")
    assert proc_cgroup_path(42, str(tmp_path)) == "/system.slice/docker-" + "cd" * 32 + ".scope"
    assert proc_cgroup_path(43, str(tmp_path)) is None
