"""busted's exceptions: one tree, each message says what to do.

    BustedError
    ├── PermissionDenied        not root / missing CAP_BPF + CAP_PERFMON
    ├── EnvironmentProblem      the host lacks something busted needs
    │   ├── BccNotInstalled     `import bcc` fails
    │   ├── KernelHeadersMissing  BCC cannot find headers for this kernel
    │   ├── TracefsNotMounted   no tracefs to attach tracepoints through
    │   └── MissingDependency   an optional Python package is not installed (names the pip extra)
    ├── ProbeUnavailable        a forced probe tier cannot run on this kernel
    ├── ProbeLoadError          BPF failed to compile, verify or attach
    ├── MonitorClosed           the Monitor was used after close()
    ├── StoreError              an output (store, JSONL file) cannot be opened or written
    ├── UsageError              an option or argument is malformed (the message shows the form)
    ├── CatalogError            a provider catalog is invalid (also a ValueError)
    ├── LabError                the network lab could not be built, did not become ready, or was misused
    └── PolicyError             a policy file is invalid (names file, line, key), or cannot be enforced

Third-party errors are translated at the boundary with ``raise Ours(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "BccNotInstalled",
    "BustedError",
    "CatalogError",
    "EnvironmentProblem",
    "KernelHeadersMissing",
    "LabError",
    "MissingDependency",
    "MonitorClosed",
    "PermissionDenied",
    "PolicyError",
    "ProbeLoadError",
    "ProbeUnavailable",
    "StoreError",
    "TracefsNotMounted",
    "UsageError",
]


class BustedError(Exception):
    """Base of every error busted raises on purpose."""


class PermissionDenied(BustedError):
    def __init__(self, detail: str = "") -> None:
        msg = (
            "busted needs root, or CAP_BPF + CAP_PERFMON (+ CAP_NET_ADMIN for sock_diag), to load "
            "BPF programs. Run it with sudo, or grant the capabilities to the interpreter."
        )
        super().__init__(f"{msg} ({detail})" if detail else msg)


class EnvironmentProblem(BustedError):
    """The host lacks something busted needs; the message says how to add it."""


class BccNotInstalled(EnvironmentProblem):
    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "The BCC Python module is not importable. It is not on PyPI: install your distribution's "
            "package (Debian/Ubuntu: `apt-get install python3-bpfcc`) and create the virtualenv with "
            "`/usr/bin/python3 -m venv --system-site-packages .venv` so it can see it. "
            "`./bootstrap.sh` does both." + (f" ({detail})" if detail else "")
        )


class KernelHeadersMissing(EnvironmentProblem):
    def __init__(self, release: str, detail: str = "") -> None:
        super().__init__(
            f"BCC cannot find kernel headers for {release}. Install `linux-headers-{release}`; if your "
            "distribution has none for this kernel, link a nearby version as "
            f"/lib/modules/{release}/build and /source (busted's BPF reads no kernel-internal "
            "structs, so that is safe). `./bootstrap.sh` does this and says what it linked."
            + (f" ({detail})" if detail else "")
        )


class TracefsNotMounted(EnvironmentProblem):
    def __init__(self) -> None:
        super().__init__(
            "tracefs is not mounted, so tracepoints cannot be attached. Run "
            "`mount -t tracefs nodev /sys/kernel/tracing` (or `mount -t debugfs none "
            "/sys/kernel/debug`), or pass Monitor(mount_tracefs=True) to let busted do it."
        )


class MissingDependency(EnvironmentProblem):
    """An optional Python package is missing; the message names the pip extra that brings it."""

    def __init__(self, package: str, extra: str, what: str = "") -> None:
        self.package, self.extra = package, extra
        super().__init__(
            f"{what or 'this feature'} needs the Python package {package!r}, which is not installed: "
            f"pip install 'busted[{extra}]' (or `pip install {package}` in busted's environment)"
        )


class ProbeUnavailable(BustedError):
    """A probe tier was forced that this kernel cannot run."""


class ProbeLoadError(BustedError):
    """BPF failed to compile, verify or attach. The message carries BCC's reason."""


class MonitorClosed(BustedError):
    def __init__(self) -> None:
        super().__init__("this Monitor is closed; create a new Monitor() to watch again")


class StoreError(BustedError):
    """An output (the event store, a JSONL file) cannot be opened or written; the message names
    the file."""


class UsageError(BustedError, ValueError):
    """An option or argument is malformed; the message names it and shows the expected form.

    Also a ``ValueError``, which is what such checks raised before this class existed."""


class CatalogError(BustedError, ValueError):
    """A provider catalog (file or entry) is invalid; the message names the file and entry.

    Also a ``ValueError``, which is what catalog loading raised before this class existed."""


class LabError(BustedError):
    """The network lab could not be built, did not become ready, or was misused."""


class PolicyError(BustedError):
    """A policy is invalid or cannot be enforced. ``path``, ``line`` and ``key`` say where (None
    when not known); the message starts with ``path:line:`` when they are."""

    def __init__(self, msg: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.path, self.line, self.key, self.reason = path, line, key, msg
        where = ":".join(str(x) for x in (path, line) if x is not None)
        if key and f"{key!r}" not in msg:
            msg = f"{msg} (key {key!r})"
        super().__init__(f"{where}: {msg}" if where else msg)
