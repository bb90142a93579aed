"""``busted query --format csv`` and spreadsheet formulas (issue 17 item 12): a text cell starting
with = + - @ TAB or CR gets a leading ' (OWASP's CSV-injection advice); numbers stay numbers."""

import csv
import io

from events_factory import IDENT

from busted.cli import main
from busted.events import FlowClosed
from busted.sinks import Store

FORMULAS = ["=HYPERLINK(\"http://x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)", "\tx", "\r=1"]


def _rows(store, table):
    out = io.StringIO()
    assert main(["query", "--store", str(store), "--table", table, "--format", "csv"], out=out) == 0
    return list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))


def test_formula_cells_are_prefixed_and_numbers_are_not(tmp_path):
    p = tmp_path / "s.db"
    with Store(p) as s:
        for i, text in enumerate(FORMULAS, 1):
            ident = {**IDENT, "flow_id": i, "comm": text[:15], "pid": 100 + i, "tid": 100 + i}
            s.write(FlowClosed(ts_ns=2, wall_time=1_700_000_001.0, **ident, provider="openai", hostname=text,
                               bytes_sent=10, bytes_received=20, duration_ns=-5))
    for table in ("flows", "events"):
        rows = _rows(p, table)
        assert sorted(r["hostname"] for r in rows) == sorted("'" + t for t in FORMULAS), table
        assert sorted(r["comm"] for r in rows) == sorted("'" + t[:15] for t in FORMULAS), table
        assert {r["pid"] for r in rows} == {str(100 + i) for i in range(1, len(FORMULAS) + 1)}
    assert {r["duration_ns"] for r in _rows(p, "events")} == {"-5"}  # a negative number is left as it is
    plain = _rows(p, "flows")[0]
    assert plain["provider"] == "openai"  # ordinary text untouched
