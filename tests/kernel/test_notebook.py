"""The example notebook runs (real capture in the lab) and produces its tables (flows; LLM calls:
tokens and spend per process and per agent) and figures."""

import base64
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).parents[2] / "examples" / "tour.ipynb"


def test_tour_notebook_runs_and_draws(tmp_path):
    nb = nbformat.read(NB, as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, "the bytes-per-provider figure is missing"
    assert base64.b64decode(pngs[0]["data"]["image/png"]).startswith(b"\x89PNG")
    assert (tmp_path / "busted_tour_bytes.png").stat().st_size > 1000
    text = "".join(o.get("text", "") for o in outputs)
    tables = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "providers:" in text and "openai" in text and "anthropic" in text
    assert "flow_closed" in tables
    # LLM calls: tokens and spend per process, and their figure
    m = re.search(r"LLM calls: (\d+), tokens: (\d+), spend: \$([0-9.]+)", text)
    assert m, text
    assert int(m[1]) >= 10 and int(m[2]) > 0 and float(m[3]) > 0  # one round: 11 LLM demo clients
    assert "input_tokens" in tables and "cost_usd" in tables and "gpt-4o-mini" in tables
    assert len(pngs) >= 2, "the tokens/spend-per-process figure is missing"
    assert (tmp_path / "busted_tour_calls.png").stat().st_size > 1000
    # calls and spend per agent: the lab's agent stand-in (claude -> bash -c -> curl) is claude-code
    assert "claude-code" in tables and "unpriced" in tables
    # ... and the notebook's own demo clients were started by its kernel: a catalogued agent too
    assert re.search(r"jupyter-kernel: \w+\[\d+\] <- ", text), text
    assert re.search(r"claude-code: curl\[\d+\] <- bash\[\d+\] <- claude\[\d+\]", text), text
