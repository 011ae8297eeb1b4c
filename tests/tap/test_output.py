"""tap/output.py: calls to Parquet and CSV files, and workers' part files merged into one."""
from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from meshlens.collector.record import Call
from meshlens.tap.output import FileSink, merge_parts


def _calls(n: int, start: int = 0) -> list[Call]:
    return [Call(time=1_700_000_000_000_000_000 + i, observer="wire", path=f"/items/{i}", status=200,
                 attributes={"close": "fin"}) for i in range(start, start + n)]


def test_parquet_and_csv_hold_every_call_with_its_attributes(tmp_path):
    for name in ("calls.parquet", "calls.csv"):
        sink = FileSink(str(tmp_path / name))
        for call in _calls(3):
            sink.record(call)
        sink.close()
        assert sink.written == 3
    table = pq.read_table(tmp_path / "calls.parquet")
    assert table.column("path").to_pylist() == ["/items/0", "/items/1", "/items/2"]
    with open(tmp_path / "calls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["/items/0", "/items/1", "/items/2"]
    assert json.loads(rows[0]["attributes"]) == {"close": "fin"}


@pytest.mark.parametrize("ext", [".parquet", ".csv"])
def test_part_files_merge_in_order_and_are_removed(tmp_path, ext):
    parts = []
    for i in range(2):
        part = str(tmp_path / f"calls.part{i}{ext}")
        sink = FileSink(part)
        for call in _calls(2, start=2 * i):
            sink.record(call)
        sink.close()
        parts.append(part)
    out = str(tmp_path / f"calls{ext}")
    assert merge_parts(out, parts) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"calls{ext}"]


def test_a_path_it_cannot_use_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--out must end in \.parquet or \.csv"):
        FileSink(str(tmp_path / "calls.json"))
    with pytest.raises(ValueError, match="^cannot write .*: No such file or directory$"):
        FileSink(str(tmp_path / "missing" / "calls.csv"))
