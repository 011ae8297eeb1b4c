"""The tap's file output: calls to Parquet or CSV in bounded batches, and the merge of workers' part files."""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["FILE_BATCH_ROWS", "FileSink", "merge_parts"]

# Calls held before a file batch is written: ~50 MB of Python objects at most.
FILE_BATCH_ROWS = 50_000


class FileSink:
    """Calls to a Parquet or CSV file, written in batches (bounded memory)."""

    def __init__(self, path: str) -> None:
        """Raises ValueError (one line, for the user) for a path it cannot write."""
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".parquet", ".csv"):
            raise ValueError(f"--out must end in .parquet or .csv, not {path!r}")
        self.path, self.kind = path, ext[1:]
        self._calls: list[Any] = []
        self._writer: Any = None
        self.written = 0
        try:
            open(path, "wb").close()
        except OSError as e:
            raise ValueError(f"cannot write {path}: {e.strerror}") from None

    def record(self, call: Any) -> None:
        self._calls.append(call)
        if len(self._calls) >= FILE_BATCH_ROWS:
            self._write()

    def _write(self) -> None:
        from meshlens.collector.columns import to_table
        from meshlens.collector.record import CALL_COLUMN_NAMES

        if not self._calls and self._writer is not None:
            return
        columns = {n: [getattr(c, n) for c in self._calls] for n in CALL_COLUMN_NAMES}
        if self.kind == "csv":
            columns["attributes"] = [json.dumps(a, sort_keys=True) for a in columns["attributes"]]
            table = to_table("calls", {k: v for k, v in columns.items() if k != "attributes"})
            import pyarrow as pa
            import pyarrow.csv as pcsv
            table = table.set_column(table.schema.get_field_index("attributes"), "attributes",
                                     pa.array(columns["attributes"], pa.string()))
            if self._writer is None:
                self._writer = pcsv.CSVWriter(self.path, table.schema)
        else:
            import pyarrow.parquet as pq
            table = to_table("calls", columns)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.written += len(self._calls)
        self._calls = []

    def close(self) -> None:
        self._write()
        self._writer.close()


def merge_parts(out: str, parts: list[str]) -> int:
    """Concatenate the workers' part files into `out`; the number of rows."""
    rows = 0
    if out.lower().endswith(".csv"):
        with open(out, "wb") as dst:
            for i, part in enumerate(parts):
                with open(part, "rb") as src:
                    header = src.readline()
                    if i == 0:
                        dst.write(header)
                    for line in src:
                        dst.write(line)
                        rows += 1  # one line a row: HTTP fields cannot hold a newline
                os.unlink(part)
        return rows
    import pyarrow.parquet as pq
    writer = None
    try:
        for part in parts:
            table = pq.read_table(part)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
            os.unlink(part)
    finally:
        if writer is not None:
            writer.close()
    return rows
