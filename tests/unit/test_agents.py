"""The agent catalog: process (exe, argv) -> agent, with the evidence."""

import json

import pytest

from busted.classify.agents import Agent, AgentCatalog, python_module

CAT = AgentCatalog.builtin()

CASES = [
    # (exe, argv, agent id, via)
    ("/tmp/x/claude", ["/tmp/x/claude", "-p", "hi"], "claude-code", "exe"),
    ("/home/u/.local/share/claude/versions/2.0.14", ["claude"], "claude-code", "exe"),
    ("/usr/bin/node", ["node", "/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js"], "claude-code", "package"),
    ("/usr/local/bin/codex", ["codex", "exec", "fix it"], "codex-cli", "exe"),
    ("/usr/lib/node_modules/@openai/codex/bin/codex-x86_64-unknown-linux-musl", ["codex"], "codex-cli", "exe"),
    ("/usr/bin/node", ["node", "/usr/lib/node_modules/@google/gemini-cli/dist/index.js"], "gemini-cli", "package"),
    ("/home/u/.local/bin/cursor-agent", ["cursor-agent"], "cursor", "exe"),
    ("/home/u/.cursor-server/bin/abc/node", ["node", "x.js"], "cursor", "exe"),
    ("/usr/bin/python3.11", ["python3", "-m", "aider", "--model", "x"], "aider", "module"),
    ("/usr/bin/python3", ["/usr/bin/python3", "/home/u/.venv/bin/aider"], "aider", "exe"),
    ("/usr/bin/python3", ["python3", "/venv/lib/python3.11/site-packages/aider/main.py"], "aider", "package"),
    ("/usr/share/code/code", ["/usr/share/code/code", "--type=extensionHost"], "vscode-extension-host", "argv"),
    ("/usr/bin/node", ["node", "/home/u/.vscode/extensions/github.copilot-chat-0.22.0/dist/x.js"],
     "github-copilot", "package"),
    ("/usr/bin/node", ["node", "/home/u/.vscode/extensions/saoudrizwan.claude-dev-3.1.0/dist/x.js"],
     "cline", "package"),
    ("/usr/bin/python3", ["python3", "-m", "openhands.core.main", "-t", "x"], "openhands", "module"),
    ("/usr/local/bin/goose", ["goose", "session"], "goose", "exe"),
    ("/usr/bin/python3", ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f",
                          "/root/.local/share/jupyter/runtime/kernel-1.json"], "jupyter-kernel", "module"),
    ("/usr/bin/python3", ["python", "-mcrewai", "run"], "crewai", "module"),
    ("/usr/bin/python3", ["python3", "-u", "-m", "autogenstudio", "ui"], "autogen", "module"),
]


@pytest.mark.parametrize(("exe", "argv", "want", "via"), CASES, ids=[c[2] + ":" + c[3] for c in CASES])
def test_builtin_matches(exe, argv, want, via):
    m = CAT.match(exe, argv)
    assert m is not None and (m.id, m.via) == (want, via)


@pytest.mark.parametrize(("exe", "argv"), [
    ("/usr/bin/curl", ["curl", "https://api.anthropic.com"]),
    ("/bin/bash", ["bash", "-c", "claude is a name in a string"]),
    ("/usr/bin/python3", ["python3", "-c", "import aider"]),  # -c, not -m
    ("/usr/bin/python3", ["python3", "script.py", "-m", "aider"]),  # -m belongs to the script
    ("/bin/bash", ["-bash"]),
    (None, None),
    (None, []),
])
def test_non_agents(exe, argv):
    assert CAT.match(exe, argv) is None


def test_argv0_path_counts_but_a_bare_title_does_not():
    assert CAT.match(None, ["/opt/tools/claude"]).id == "claude-code"
    assert CAT.match("/usr/bin/node", ["claude"]) is None  # a process title anyone can set


def test_python_module():
    assert python_module(["python3", "-m", "x.y"]) == "x.y"
    assert python_module(["python3.12", "-X", "dev", "-mfoo"]) == "foo"
    assert python_module(["python3", "-m"]) is None
    assert python_module(["node", "-m", "x"]) is None
    assert python_module([]) is None


def test_builtin_catalog_is_valid_and_names_are_unique():
    data = json.loads(open(__import__("busted.classify", fromlist=["x"]).__path__[0] + "/data/agents.json").read())
    ids = [a["id"] for a in data["agents"]]
    assert len(ids) == len(set(ids)) == len(CAT)
    names = [n for a in data["agents"] for n in a.get("names", [])]
    assert len(names) == len(set(names))


def test_user_extension_file_overrides_and_adds(tmp_path):
    p = tmp_path / "agents.json"
    p.write_text(json.dumps({"agents": [
        {"id": "inhouse", "name": "In-house bot", "kind": "framework", "modules": ["acme.bot"]},
        {"id": "claude-code", "name": "Claude (ours)", "kind": "coding-agent", "names": ["cc"]},
    ]}))
    cat = AgentCatalog.from_file(p)
    assert cat.match("/usr/bin/python3", ["python3", "-m", "acme.bot.run"]).id == "inhouse"
    assert cat.match("/bin/cc", ["cc"]).agent.name == "Claude (ours)"
    assert cat.match("/tmp/claude", ["claude"]) is None  # the replaced entry's names are gone
    assert len(cat) == len(CAT) + 1
    toml = tmp_path / "a.toml"
    toml.write_text('[[agents]]\nid = "t"\nname = "T"\nkind = "cli"\nnames = ["tbot"]\n')
    assert AgentCatalog.from_file(toml, base=AgentCatalog()).match("/x/tbot", []).id == "t"


@pytest.mark.parametrize(("doc", "msg"), [
    ({"agents": [{"id": "x", "name": "X", "kind": "robot", "names": ["x"]}]}, "kind"),
    ({"agents": [{"id": "x", "name": "X", "kind": "cli"}]}, "at least one"),
    ({"agents": [{"id": "x", "name": "X", "kind": "cli", "names": ["x"], "color": 1}]}, "unknown agent field"),
    ({"agents": [{"id": "x", "name": "X", "kind": "cli", "names": "x"}]}, "non-empty strings"),
    ({"nope": []}, "'agents' list"),
])
def test_bad_catalog_files_say_why(tmp_path, doc, msg):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=msg):
        AgentCatalog.from_file(p, base=AgentCatalog())


def test_add_and_memo_invalidation():
    cat = AgentCatalog.builtin()
    assert cat.match("/x/zed-agent", ["zed-agent"]) is None
    cat.add(Agent(id="zed", name="Zed", kind="ide-extension", names=("zed-agent",)))
    assert cat.match("/x/zed-agent", ["zed-agent"]).id == "zed"


def test_hostile_input_never_raises():
    assert CAT.match("\x00" * 10000, ["a" * 100000] * 100) is None
    assert CAT.match(123, [None, 5, "python3"]) is None  # type: ignore[arg-type]
