from hypothesis import given
from hypothesis import strategies as st

from busted.procinfo import read_proc
from busted.redact import MASK, redact_argv, redact_text


def test_curl_headers_and_flags():
    argv = ["curl", "-H", "Authorization: Bearer sk-abcdef123456", "-H", "x-api-key: sk-ant-api03-zzzzzzzz",
            "-H", "content-type: application/json", "--api-key", "plainsecret", "--token=abc123",
            "-u", "me:pw", "https://api.openai.com/v1?key=AIzaSyA1234567890123456789012345"]
    out = redact_argv(argv)
    joined = " ".join(out)
    for secret in ("sk-abcdef123456", "sk-ant-api03", "plainsecret", "abc123", "me:pw", "AIzaSyA123"):
        assert secret not in joined
    assert out[4] == "content-type: application/json" or "content-type" in joined
    assert "Authorization: " + MASK in out


def test_text_forms():
    assert redact_text("api-key=foo bar") == "api-key=" + MASK
    assert "sk-proj-" not in redact_text("OPENAI_API_KEY=sk-proj-ABCDEFGHIJ")
    assert redact_text("nothing to see") == "nothing to see"


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=40))
def test_any_bearer_token_is_masked(tok):
    assert tok not in " ".join(redact_argv(["curl", "-H", f"Authorization: Bearer {tok}"]))
    assert tok not in " ".join(redact_argv(["tool", f"--api-key={tok}"]))


def test_read_proc_masks_this_process(tmp_path):
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)", "--api-key", "sk-test-1234567890"])
    try:
        time.sleep(0.2)
        info = read_proc(p.pid)
        assert info.cmdline and "sk-test-1234567890" not in " ".join(info.cmdline)
    finally:
        p.kill()
