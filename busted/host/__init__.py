"""Host facts, read as root from the running system: processes (``procinfo``), cgroups and the
containers they belong to (``cgroups``), the process tree from the kernel's lineage records
(``lineage``), and TCP sockets open before the monitor (``preexisting``, sock_diag)."""
