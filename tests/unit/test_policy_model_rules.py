"""Model rules compiled for the kernel (busted/policy/model_enforce.py): which ones it checks, their
map entries, and what `busted policy check` says about the others."""

import io
from argparse import Namespace

from busted import Policy
from busted.policy.model_enforce import compile_models


def test_check_says_what_the_kernel_checks():
    from busted.policy.model_enforce import compile_models

    pol = Policy.from_dict({"default": "allow", "rules": [
        {"name": "a", "action": "deny", "model": ["gpt-4o", "o1*"]},
        {"name": "b", "action": "deny", "model": "gpt-4o", "provider": "openai"},
        {"name": "c", "action": "audit", "provider": "anthropic"},
        {"name": "d", "action": "deny", "model": "claude-*"},
    ]})
    m = compile_models(pol)
    assert m.kernel == {"a"}
    assert m.entries == {b"gpt-4o\0": (0, 0, 0), b"o1": (0, 0, 0)}
    notes = "\n".join(m.notes)
    assert "b: model checked in user space only (with provider)" in notes
    assert "d: model checked in user space only (after the 'c' rule, which is not a deny)" in notes
    assert "up to 64 bytes" in "\n".join(compile_models(Policy.from_dict({"rules": [
        {"name": "g", "action": "deny", "model": "gpt-?o"}]})).notes)


def test_exact_names_are_whole_values_and_uid_is_kept():
    m = compile_models(Policy.from_dict({"rules": [
        {"name": "u", "action": "deny", "model": ["gpt-4o", "x" * 65], "uid": 1000}]}))
    assert m.kernel == set() and "'" + "x" * 65 + "'" in m.notes[0]
    m = compile_models(Policy.from_dict({"rules": [{"name": "u", "action": "deny", "model": "gpt-4o", "uid": 1000}]}))
    assert m.entries == {b"gpt-4o\0": (0, 1, 1000)}  # NUL: "gpt-4o-mini" is not under it


def test_policy_check_prints_the_model_notes(tmp_path):
    from busted.cli.policy import policy_command

    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nname = "no-4o"\naction = "deny"\nmodel = "gpt-4o"\n'
                 '[[rules]]\nname = "g"\naction = "deny"\nmodel = "gemini*"\nexe = "/usr/bin/*"\n')
    f.chmod(0o600)
    out = io.StringIO()
    assert policy_command(Namespace(file=str(f)), out) == 0
    text = out.getvalue()
    assert "no-4o: model checked in the kernel" in text
    assert "g: model checked in user space only (with exe)" in text
