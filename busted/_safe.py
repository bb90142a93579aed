"""Running as root on a host other people use: the files busted writes and the interpreters it starts.

Files (the SQLite store, its lock, -wal and -shm, JSONL output and its rotations):

- The directory, and every directory above it, must be writable only by this user or root; a
  world-writable one is accepted only with the sticky bit (``/tmp``), where others cannot rename or
  remove our files. Otherwise another user could swap the file for a link to any file root can
  write, between our check and our open, so busted refuses (``StoreError`` saying what to do).
- A new file is created ``O_CREAT | O_EXCL | O_NOFOLLOW`` with mode 0600: captured prompts are
  not for every local user to read.
- An existing file is opened ``O_NOFOLLOW`` (never through a symbolic link) and kept only if it is a
  regular file with one link (no hard link to another file), owned by this user and not writable by
  group or others (the rule the bytecode cache applies to its files); else refused.

Input files busted acts on (``--prices``): ``read_input`` reads one only if the file is owned by root
or this user and writable by nobody else, and its directory (and the real file's, when it is a link)
passes the directory rule above; otherwise ``UsageError`` says what to fix.

Child interpreters: ``python -m mod`` puts the current directory first on ``sys.path``, so root
running busted from a directory another user owns would import that user's ``json.py``.
``python_argv`` starts children with ``-I`` (no current directory, no ``PYTHON*`` variables, no
user site-packages), from ``/`` (``CHILD_CWD``), with ``child_env()``: a fixed ``PATH`` and only the
caller's locale and BCC's settings (``BCC_*``, ``ARCH``).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from busted.errors import StoreError, UsageError

__all__ = ["CHILD_CWD", "SAFE_PATH", "Untrusted", "check_dir", "child_env", "dir_problem", "distrust", "file_problem",
           "input_problem", "open_private", "python_argv", "read_input", "read_text_trusted", "trusted"]

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHILD_CWD = "/"
_KEEP_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "ARCH")  # + every BCC_*; ARCH, BCC_*: BCC's compile settings


# -- files ---------------------------------------------------------------------------------------


def distrust(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with status ``st`` fails the trust rule (owned by this user,
    writable by nobody else), or None. The bytecode cache and policy files use it."""
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by uid {os.geteuid()} (this process)"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else: the rule for files busted trusts or appends to."""
    return distrust(st, "") is None


class Untrusted(OSError):
    """A file or its directory fails the trust rule (the message says which and why)."""


def read_text_trusted(path: str) -> str:
    """The text of ``path`` if the file (not a symlink) and its directory pass the trust rule;
    else ``Untrusted`` (an OSError), or the OSError/ValueError of opening or decoding it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        d = os.path.dirname(os.path.abspath(path))
        why = distrust(os.fstat(f.fileno()), f"file {path}") or distrust(os.stat(d), f"directory {d}")
        if why:
            raise Untrusted(why)
        return f.read()


def _dir_ok(st: os.stat_result) -> bool:
    if st.st_uid not in (0, os.geteuid()):
        return False  # its owner can always chmod it and swap what is inside
    return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or bool(st.st_mode & stat.S_ISVTX)


def dir_problem(directory: str | os.PathLike[str]) -> str | None:
    """Why files in ``directory`` could be swapped by another user, or None when they cannot.

    Checks the directory and each one above it (symbolic links resolved: the real path is what counts)."""
    real = Path(os.path.realpath(directory))
    for d in (real, *real.parents):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue  # the open that follows says so, with its own advice
        except OSError as exc:
            return f"cannot check directory {d} ({exc.strerror})"
        if not _dir_ok(st):
            who = f"uid {st.st_uid}" if st.st_uid not in (0, os.geteuid()) else "other users"
            mode = stat.S_IMODE(st.st_mode)
            return (f"directory {d} can be written by {who} (owner uid {st.st_uid}, mode {mode:o}), "
                    "who could swap the file for a link to any file this user can write")
    return None


def check_dir(path: str | os.PathLike[str], what: str) -> None:
    """Raise ``StoreError`` if the directory holding ``path`` is not safe for ``what`` (e.g. "--store")."""
    parent = os.path.dirname(os.path.abspath(path))
    why = dir_problem(parent)
    if why:
        raise StoreError(f"{what} {path}: {why}. Choose a directory only uid {os.geteuid()} (or root) can "
                         f"write, e.g. /var/lib/busted, or fix it: chown root DIR; chmod go-w DIR")


def file_problem(st: os.stat_result) -> str | None:
    """Why an existing output file (``lstat``/``fstat`` result) must not be appended to, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (busted does not follow links for its outputs)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (it may be another file under a second name)"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if not trusted(st):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def input_problem(path: str | os.PathLike[str], st: os.stat_result) -> str | None:
    """Why an input file (``st``: its ``fstat``) could be changed by another user, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    dirs = {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}
    return next((why for why in map(dir_problem, sorted(dirs)) if why), None)


def read_input(path: str | os.PathLike[str], flag: str, effect: str, *, limit: int = 16 << 20) -> bytes:
    """The bytes of an input file busted acts on, read from the descriptor that was checked
    (``input_problem``); ``UsageError`` naming ``flag``, what another user could do (``effect``)
    and the fix when the file is not trusted or cannot be read. At most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang us
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read ({exc.strerror})") from exc
    try:
        why = input_problem(path, os.fstat(fd))
        if why:
            raise UsageError(f"{flag} {path}: {why}: another user could {effect}, and busted runs as root. "
                             f"Fix: chown root {path}; chmod go-w {path} (and the directories above it), "
                             "or copy it to a directory only root can write")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UsageError(f"{flag} {path}: larger than {limit} bytes; is it the right file?")
    return data


def open_private(path: str | os.PathLike[str], flags: int, what: str) -> tuple[int, bool]:
    """Open an output file as described in the module docstring: ``(fd, created)``.

    ``flags`` is the access mode and extras (``O_WRONLY | O_APPEND``, ``O_RDWR``); a file that exists
    and fails the rules raises ``StoreError`` naming what to do; other ``OSError``s pass through."""
    check_dir(path, what)
    base = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a planted FIFO must not hang us
    try:
        fd = os.open(path, flags | base | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, flags | base)
        except OSError as exc:
            if os.path.islink(path):
                raise StoreError(f"{what} {path}: is a symbolic link; busted does not follow links for its "
                                 "outputs (another user could point one at any file). Remove it or give the "
                                 "real path") from exc
            raise
        created = False
    try:
        if not created:
            why = file_problem(os.fstat(fd))
            if why:
                raise StoreError(f"{what} {path}: {why}; refusing to write it. Remove or move it, or choose "
                                 "another path")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


# -- child interpreters --------------------------------------------------------------------------

_BOOT = ("import runpy, sys; r, m = sys.argv[1:3]; del sys.argv[1:3]; "
         "sys.path.append(r) if r not in sys.path else None; "
         "runpy.run_module(m, run_name='__main__', alter_sys=True)")


def python_argv(module: str, *args: str, unbuffered: bool = False) -> list[str]:
    """``python -m module args`` for a child of a root process: ``-I`` (isolated), and the directory
    this ``busted`` was imported from added *last* to ``sys.path`` (so a checkout run without
    installing still works, and nothing there shadows the standard library). Start it with
    ``cwd=CHILD_CWD, env=child_env()``."""
    root = str(Path(__file__).resolve().parents[1])
    return [sys.executable, "-I", *(["-u"] if unbuffered else []), "-c", _BOOT, root, module, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a child needs and no more: a fixed PATH, the locale, BCC's settings; plus ``extra``."""
    env = {"PATH": SAFE_PATH}
    env.update({k: v for k, v in os.environ.items() if k in _KEEP_ENV or k.startswith("BCC_")})
    env.update(extra or {})
    return env
