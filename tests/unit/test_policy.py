"""Policy files: parsing, errors with file/line/key, first-match-wins evaluation."""

import textwrap

import needs
import pytest

from busted import Policy, PolicyError
from busted.policy.rules import Subject, container_of

ISSUE_EXAMPLE = textwrap.dedent("""\
    default = "audit"                 # allow | audit | deny
    [[rules]]
    name = "nobody-calls-deepseek"
    action = "deny"
    provider = "deepseek"             # a string or a list
    [[rules]]
    name = "curl-may-not-call-anthropic"
    action = "deny"
    provider = ["anthropic"]
    comm = "curl"
""")


def test_issue_example_parses_as_written():
    p = Policy.loads(ISSUE_EXAMPLE, source="p.toml")
    assert p.default == "audit"
    assert [(r.name, r.action, r.provider, r.comm, r.line) for r in p.rules] == [
        ("nobody-calls-deepseek", "deny", ("deepseek",), None, 2),
        ("curl-may-not-call-anthropic", "deny", ("anthropic",), ("curl",), 6),
    ]
    assert p == Policy.from_dict(p.to_dict())


def test_first_match_wins_and_default_only_for_providers():
    p = Policy.loads(ISSUE_EXAMPLE)
    d = p.evaluate(Subject(provider="anthropic", comm="curl"))
    assert (d.rule, d.action, d.matched) == ("curl-may-not-call-anthropic", "deny",
                                              (("provider", "anthropic"), ("comm", "curl")))
    d = p.evaluate(Subject(provider="anthropic", comm="python3"))
    assert (d.rule, d.action) == ("default", "audit")
    assert p.evaluate(Subject(provider="deepseek", comm="curl")).rule == "nobody-calls-deepseek"
    # not an LLM provider and no rule names its host: not the policy's business
    assert p.evaluate(Subject(hostname="example.org", comm="curl")) is None


def test_allow_one_service_then_deny_the_rest():
    p = Policy.from_dict({"default": "audit", "rules": [
        {"name": "assistant", "action": "allow", "provider": "anthropic", "cgroup": "/system.slice/assistant.service"},
        {"name": "others", "action": "deny", "provider": "anthropic"},
    ]})
    ok = Subject(provider="anthropic", cgroup="/system.slice/assistant.service/worker")
    assert p.evaluate(ok).action == "allow"
    # a string prefix that is not a path prefix does not match
    assert p.evaluate(Subject(provider="anthropic", cgroup="/system.slice/assistant.servicex")).action == "deny"
    assert p.evaluate(Subject(provider="anthropic", cgroup=None)).action == "deny"
    assert p.evaluate(Subject(provider="openai")).action == "audit"


def test_hostname_globs_uid_exe_container_model():
    p = Policy.from_dict({"rules": [
        {"name": "m", "action": "deny", "model": "gpt-4*"},
        {"name": "h", "action": "deny", "hostname": "*.DeepSeek.com", "uid": [0, 1000]},
        {"name": "e", "action": "allow", "exe": "*/python3*", "provider": "openai"},
        {"name": "c", "action": "deny", "container": "abc1"},
    ]})
    assert p.evaluate(Subject(hostname="api.deepseek.com.", uid=1000)).rule == "h"
    assert p.evaluate(Subject(hostname="deepseek.com", uid=1000)) is None  # '*.' needs a label
    assert p.evaluate(Subject(hostname="api.deepseek.com", uid=7)) is None
    assert p.evaluate(Subject(provider="openai", exe="/usr/bin/python3.11")).rule == "e"
    cid = "abc1" + "0" * 60
    path = f"/system.slice/docker-{cid}.scope"
    assert container_of(path) == cid and container_of("/user.slice") is None
    assert p.evaluate(Subject(provider="openai", exe="/usr/bin/curl", container=container_of(path))).rule == "c"
    # model rules only at the LLM request point
    s = Subject(provider="openai", exe="/usr/bin/curl", model="gpt-4o")
    assert p.evaluate(s).rule == "default"
    assert p.evaluate(s, known_model=True).rule == "m"
    # unknown exe (process gone) does not match an exe rule
    assert p.evaluate(Subject(provider="openai", exe=None)).rule == "default"


def test_uid_by_name():
    p = Policy.from_dict({"rules": [{"name": "r", "action": "deny", "uid": "root"}]})
    assert p.rules[0].uid == (0,)


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    ('default = "audit"\n[[rules]]\nname = "a"\naction = "deny"\nproviderr = "x"\n', 5, "providerr", "unknown key"),
    ('[[rules]]\nname = "a"\naction = "block"\n', 3, "action", "one of allow, audit, deny"),
    ('[[rules]]\nname = "a"\n\nprovider = "x"\n', 1, "action", "has no action"),
    ('[[rules]]\nname = "a"\naction = "deny"\nhostname = "api.[openai.com"\n', 4, "hostname", "without ']'"),
    ('[[rules]]\nname = "a"\naction = "deny"\nhostname = "api openai"\n', 4, "hostname", "characters"),
    ('[[rules]]\nname = "a"\naction = "deny"\nexe = "curl"\n', 4, "exe", "paths"),
    ('[[rules]]\nname = "a"\naction = "deny"\ncomm = "a-very-long-process-name"\n', 4, "comm", "15"),
    ('[[rules]]\nname = "a"\naction = "deny"\nuid = "no-such-user-here"\n', 4, "uid", "no user"),
    ('[[rules]]\nname = "a"\naction = "deny"\ncgroup = "system.slice"\n', 4, "cgroup", "starting with '/'"),
    ('[[rules]]\nname = "a"\naction = "deny"\nprovider = []\n', 4, "provider", "empty list"),
    ('default = "maybe"\n', 1, "default", "default must be"),
    ('defualt = "deny"\n', 1, "defualt", "unknown key"),
    ('[[rules]]\nname = "a"\naction = "deny"\n[[rules]]\nname = "a"\naction = "allow"\n', 5, "name", "twice"),
    ('[[rules]]\nname = "a"\naction = "deny"\nprovider = "OpenAI"\n', 4, "provider", "not a provider id"),
])
def test_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(PolicyError) as ei:
        Policy.load(f)
    e = ei.value
    assert (e.path, e.line, e.key) == (str(f), line, key)
    assert str(e).startswith(f"{f}:{line}: ")
    assert words in str(e)


def test_toml_syntax_error_has_a_line(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('default = "audit"\n[[rules]]\nname = "a\n')
    with pytest.raises(PolicyError) as ei:
        Policy.load(f)
    assert ei.value.line == 3 and "not valid TOML" in str(ei.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.toml")


def test_describe_lists_rules_in_order():
    out = Policy.loads(ISSUE_EXAMPLE, source="p.toml").describe().splitlines()
    assert out[0] == "policy p.toml: 2 rule(s), first match wins"
    assert out[1].split() == ["1.", "deny", "nobody-calls-deepseek", "[provider=deepseek]", "(line", "2)"]
    assert "comm=curl" in out[2] and out[3].split()[:3] == ["-", "audit", "default"]


def test_describe_says_which_exe_globs_the_kernel_cannot_match():
    out = Policy.from_dict({"rules": [
        {"name": "k", "action": "deny", "provider": "openai", "exe": ["/usr/bin/curl", "/opt/a/*"]},
        {"name": "u", "action": "deny", "provider": "openai", "exe": "*curl*"},
        {"name": "a", "action": "allow", "exe": "/usr/*/python3"}]}).describe().splitlines()
    assert out[1].split()[:3] == ["1.", "deny", "k"] and out[2].split()[:3] == ["2.", "deny", "u"]
    assert out[3].strip().startswith("exe *curl*: user space only") and out[3].endswith("reported, not enforced")
    assert out[5].strip().startswith("exe /usr/*/python3: user space only") and out[5].endswith(
        "ends the kernel's search")


def test_cli_policy_check(tmp_path, capsys):
    import io

    from busted.cli import main

    good = tmp_path / "good.toml"
    good.write_text(ISSUE_EXAMPLE)
    out = io.StringIO()
    assert main(["policy", "check", str(good)], out=out) == 0
    assert "2 rule(s)" in out.getvalue() and "curl-may-not-call-anthropic" in out.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "a"\naction = "deny"\ncomm = ["curl", 3]\n')
    assert main(["policy", "check", str(bad)], out=io.StringIO()) == 2
    assert f"{bad}:4: " in capsys.readouterr().err


def test_reloader_keeps_the_old_policy_on_errors(tmp_path):
    import io

    from busted.cli.policy import Reloader

    class FakeMonitor:
        closed = False

        def __init__(self):
            self.policy = Policy.loads(ISSUE_EXAMPLE)

        def set_policy(self, path):
            self.policy = Policy.load(path)  # raises PolicyError before replacing

    f = tmp_path / "p.toml"
    mon, err = FakeMonitor(), io.StringIO()
    r = Reloader(mon, str(f), err=err, install=False)
    f.write_text('[[rules]]\nname = "a"\naction = "allow"\n')
    assert r.reload() and mon.policy.rules[0].name == "a"
    f.write_text('[[rules]]\nname = "b"\naction = "nope"\n')
    assert not r.reload() and mon.policy.rules[0].name == "a"
    lines = err.getvalue().splitlines()
    assert "policy reloaded" in lines[0] and "(1 rules)" in lines[0]
    assert lines[1].startswith("busted: policy not reloaded, the previous one stays in force: ")
    assert f"{f}:3:" in lines[1]


def test_llm_calls_are_judged_with_their_model():
    from busted import Direction, LlmCall
    from busted.policy.rules import Policy, PolicyJudge

    pol = Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-o1", "action": "deny", "model": "o1*"}]})
    call = LlmCall(ts_ns=1, wall_time=1.0, flow_id=5, direction=Direction.CONNECT, pid=7, tid=7, uid=0,
                   comm="python3", family=4, saddr="10.0.0.1", sport=1, daddr="10.0.0.2", dport=443,
                   provider="openai", hostname="api.openai.com", api="openai.chat", request_model="o1-mini")
    out = PolicyJudge(pol).feed([call])
    assert out[0] is call
    (d,) = out[1:]
    assert (d.rule, d.action, d.point, d.enforced, d.flow_id) == ("no-o1", "deny", "llm_request", False, 5)
    assert ("model", "o1-mini") in d.matched
    other = PolicyJudge(pol).feed([LlmCall(**{**call.__dict__, "request_model": "gpt-4o"})])
    assert [e.kind for e in other] == ["llm_call", "policy_decision"] and other[1].rule == "default"


def _check(path):
    import io

    from busted.cli import main

    return main(["policy", "check", str(path)], out=io.StringIO())


def test_unknown_provider_is_refused_with_the_nearest_id(tmp_path, capsys):
    """Issue 18 item 11: ``provider = "deepseeek"`` was accepted and silently matched nothing."""
    from busted.classify import Catalog
    from busted.policy.enforce import PolicyRuntime

    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nname = "a"\naction = "deny"\nprovider = ["openai", "deepseeek"]\n')
    assert _check(f) == 2
    err = capsys.readouterr().err
    assert f"{f}:1: " in err and "'deepseeek' is not in the provider catalog; did you mean 'deepseek'?" in err
    with pytest.raises(PolicyError, match="did you mean 'deepseek'"):  # the monitor's load, dry run too
        PolicyRuntime(Policy.load(f), Catalog.builtin(), enforce=False)
    rt = PolicyRuntime(Policy.loads(ISSUE_EXAMPLE), Catalog.builtin(), enforce=False)
    with pytest.raises(PolicyError, match="did you mean"):  # a reload keeps the old policy
        rt.set_policy(Policy.load(f))
    assert rt.policy == Policy.loads(ISSUE_EXAMPLE)
    f.write_text('[[rules]]\nname = "a"\naction = "deny"\nprovider = "zzzzqqq"\n')
    assert _check(f) == 2 and "(known: " in capsys.readouterr().err


def test_rule_limits_are_refused_at_load_not_only_with_enforce(tmp_path, capsys):
    """Issue 18 item 11: 63 rules worked in a dry run and were refused only by --enforce."""
    f = tmp_path / "p.toml"
    f.write_text("".join(f'[[rules]]\nname = "r{i}"\naction = "deny"\nuid = {i}\n' for i in range(63)))
    assert _check(f) == 2
    err = capsys.readouterr().err
    assert "63 rules: at most 62" in err and f"{f}:249: " in err  # the 63rd rule's line
    f.write_text("".join(f'[[rules]]\nname = "r{i}"\naction = "deny"\nuid = {i}\n' for i in range(62)))
    assert _check(f) == 0
    f.write_text('[[rules]]\nname = "w"\naction = "deny"\nuid = [0, 1, 2, 3, 4, 5, 6, 7, 8]\n'
                 'comm = ["a", "b", "c", "d", "e", "f", "g", "h"]\n')
    assert _check(f) == 2 and "72 kernel rule entries" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["other-owner", "world-writable", "group-writable", "dir-writable", "symlink"])
def test_untrusted_policy_file_is_refused(tmp_path, capsys, how):
    """Issue 18 item 11: the policy file gets the BPF cache's trust rule (owner, mode, directory)."""
    import os

    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    f = d / "p.toml"
    f.write_text(ISSUE_EXAMPLE)
    f.chmod(0o644)
    assert Policy.load(f).rules[0].name == "nobody-calls-deepseek"  # trusted as it is
    want = "not trusted"
    if how == "other-owner":
        needs.root("chown to another user")  # unit tests run as root here and in CI
    if how == "other-owner":
        os.chown(f, os.geteuid() + 1 if os.geteuid() == 0 else 0, -1)  # as root; else it is root's
        want = "owned by uid"
    elif how == "world-writable":
        f.chmod(0o646)
    elif how == "group-writable":
        f.chmod(0o664)
    elif how == "dir-writable":
        d.chmod(0o777)
        want = f"directory {d} is writable by its group or by others"
    else:
        link = d / "link.toml"
        link.symlink_to(f)
        f = link
        want = "symbolic link"
    with pytest.raises(PolicyError, match=want):
        Policy.load(f)
    assert _check(f) == 2 and want in capsys.readouterr().err
