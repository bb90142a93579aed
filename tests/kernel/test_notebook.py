"""The example notebook runs (real capture in the lab) and produces its table and figure."""

import base64
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
