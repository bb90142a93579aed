"""The package layout is the pipeline (docs/architecture.md): every module sits in the package of its
stage, imports point only from a stage to the stages below it, and modules import no cycle.

Read from the source (``ast``), so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "busted"

# stage -> the module prefixes it is made of
STAGES = {
    "base": ("busted.errors", "busted.events", "busted.redact", "busted._text", "busted._safe"),
    "wire": ("busted.wire",),
    "classify": ("busted.classify",),
    "kernel": ("busted.ebpf",),
    "host": ("busted.host",),
    "pipeline": ("busted.pipeline",),
    "policy": ("busted.policy",),
    "outputs": ("busted.sinks", "busted.web"),
    "lab": ("busted.lab",),
    "monitor": ("busted.monitor", "busted.options"),
    "cli": ("busted.cli",),
    "api": ("busted",),  # busted/__init__.py: the public names
}
# what each stage may import besides itself (the layers of docs/architecture.md)
ALLOWED = {
    "base": set(),
    "wire": {"base"},
    "classify": {"base"},
    "kernel": {"base", "wire"},
    "host": {"base", "classify", "wire", "kernel"},
    "pipeline": {"base", "classify", "wire", "host"},  # not the kernel: the flow table decides, the Monitor does
    "policy": {"base", "classify", "wire", "kernel", "host"},
    "outputs": {"base", "classify"},
    "lab": {"base"},
    "monitor": {"base", "classify", "wire", "kernel", "host", "pipeline", "policy"},
    "cli": {"base", "classify", "wire", "kernel", "host", "pipeline", "policy", "outputs", "lab", "monitor", "api"},
    "api": {"base", "monitor", "policy", "outputs"},
}
# The version string is the one name any stage may take from the package root.
ROOT_NAMES_ANYONE_MAY_IMPORT = {"__version__"}
TOP_LEVEL = {"__init__", "errors", "events", "options", "redact", "_text", "_safe"}
PACKAGES = {"classify", "cli", "ebpf", "host", "lab", "monitor", "pipeline", "policy", "sinks", "web", "wire"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(mod: str) -> str:
    best = ""
    for stage, prefixes in STAGES.items():
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > len(best):
                best, found = p, stage
    assert best, f"{mod} is in no stage: put it in the package of its stage (docs/architecture.md)"
    return found


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported module, line, at module level)]"""
    known = {_module(p) for p in ROOT.rglob("*.py")}
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module(path)
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        got = out.setdefault(mod, [])
        for node in ast.walk(tree):
            at_top = id(node) in top
            if isinstance(node, ast.Import):
                got += [(a.name, node.lineno, at_top) for a in node.names if a.name.split(".")[0] == "busted"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "busted":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in known:
                        got.append((sub, node.lineno, at_top))
                    elif node.module == "busted" and a.name in ROOT_NAMES_ANYONE_MAY_IMPORT:
                        continue
                    else:
                        got.append((node.module, node.lineno, at_top))
    return out


def test_top_level_holds_only_the_public_modules():
    names = {p.stem for p in ROOT.glob("*.py")}
    assert names == TOP_LEVEL, f"move {sorted(names - TOP_LEVEL)} into the package of its stage"
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert packages == PACKAGES, "a package was added or removed: give it a stage here and in docs/architecture.md"
    for p in ROOT.rglob("*.py"):
        _stage(_module(p))


def test_imports_point_down_the_stages():
    bad = []
    for mod, imps in _imports().items():
        st = _stage(mod)
        for target, line, _ in imps:
            ts = _stage(target)
            if ts != st and ts not in ALLOWED[st]:
                bad.append(f"{mod}:{line} ({st}) imports {target} ({ts})")
    assert bad == []


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, top in imps if top and t != m} for m, imps in _imports().items()}
    # a package's __init__ that re-exports its modules is not a cycle with them
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_graph_is_read():
    """The checks above see the imports they judge (a parse that found nothing would pass them)."""
    imps = _imports()
    assert ("busted.pipeline.flows", True) in {(t, top) for t, _, top in imps["busted.monitor"]}
    assert _stage("busted.pipeline.flows") == "pipeline" and _stage("busted") == "api"
