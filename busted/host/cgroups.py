"""cgroup v2 ids -> paths, and a live process's cgroup v2 path. The I/O half of container naming
(the pure half is ``busted.classify.containers``).

BPF's ``bpf_get_current_cgroup_id()`` is the inode number of the process's cgroup directory in
the cgroup v2 filesystem, so the path is found by walking that filesystem once and indexing
directories by inode. A cgroup created later is found by walking again, at most every
``rewalk_s`` (a miss storm must not become a walk storm); a cgroup removed before we looked
stays unknown (None).
"""

from __future__ import annotations

import os
import time

from cachetools import LRUCache

from busted.classify.containers import cgroup_path_from_proc

__all__ = ["CgroupPaths", "cgroup2_mount", "proc_cgroup_path"]


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 filesystem is mounted (``/sys/fs/cgroup`` or ``.../unified``), or None."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        return None
    return None


def proc_cgroup_path(pid: int, root: str = "/proc") -> str | None:
    """The cgroup v2 path of a live process (``/proc/<pid>/cgroup``), None if gone or unknown."""
    try:
        with open(f"{root}/{pid}/cgroup") as f:
            return cgroup_path_from_proc(f.read(8192))
    except OSError:
        return None


class CgroupPaths:
    """cgroup id -> path relative to the v2 root (``/docker/<id>``), cached and bounded."""

    def __init__(self, mount: str | None = None, *, rewalk_s: float = 0.2, max_dirs: int = 65536) -> None:
        self.mount = mount if mount is not None else cgroup2_mount()
        self._paths: LRUCache[int, str] = LRUCache(maxsize=max_dirs)
        self._rewalk_s = rewalk_s
        self._max_dirs = max_dirs
        self._next_walk = 0.0
        self.walks = 0

    def _walk(self) -> None:
        self.walks += 1
        root = self.mount
        if root is None:
            return
        stack = [(root, "/")]
        n = 0
        while stack and n < self._max_dirs:  # bounded: a hostile tree cannot keep us here
            d, rel = stack.pop()
            try:
                st = os.stat(d)
                it = os.scandir(d)
            except OSError:
                continue
            self._paths[st.st_ino] = rel
            n += 1
            with it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append((e.path, rel.rstrip("/") + "/" + e.name))

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.mount is None:
            return None
        p = self._paths.get(cgroup_id)
        if p is not None:
            return p
        now = time.monotonic()
        if now < self._next_walk:
            return None
        self._next_walk = now + self._rewalk_s
        self._walk()
        return self._paths.get(cgroup_id)
