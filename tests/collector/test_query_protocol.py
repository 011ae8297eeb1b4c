"""The query endpoint's protocol core as transcripts: statements, SQL built, encodings, error text."""
from __future__ import annotations

import gzip

import pytest

from meshlens.collector.query_protocol import ENCODINGS, QueryError, build_sql, choose_encoding, decompress, inspect


@pytest.mark.parametrize("accept, expected", [
    ("gzip", "gzip"), ("deflate", "deflate"), ("lz4,zstd,gzip,deflate", ENCODINGS[0]), ("identity", None),
    ("gzip;q=0, deflate", "deflate"), ("GZIP; q=0.5", "gzip"), ("br", None), ("*", ENCODINGS[0]), ("", None),
])
def test_choose_encoding(accept: str, expected: str | None) -> None:
    assert choose_encoding(accept) == expected


@pytest.mark.parametrize("normal, fmt", [
    ("SELECT 1", None),
    ("SELECT 1 FORMAT JSON", "JSON"),
    ("SELECT FORMAT FROM (SELECT 1 AS FORMAT)", None),
    ("SELECT format('{}', 'a') FORMAT Native", "Native"),
    ("SHOW TABLES FROM meshlens FORMAT JSONEachRow", "JSONEachRow"),
    ("WITH 1 AS a SELECT a", None),
    ("EXPLAIN SYNTAX SELECT 1", None),
    ("DESCRIBE TABLE meshlens.calls", None),
    ("EXISTS TABLE meshlens.calls", None),
    ("SELECT 'file(' AS s, URLHierarchy('http://a/b')", None),
])
def test_inspect_accepts(normal: str, fmt: str | None) -> None:
    assert inspect(normal).output_format == fmt


def test_build_sql_uses_database_and_settings_then_readonly() -> None:
    settings = {"max_threads": "2", "session_timezone": "Europe/Paris"}
    sql = build_sql(inspect("SELECT 1 FORMAT JSON"), "my`db", settings)
    assert sql == ("USE `my\\`db`; SELECT 1 FORMAT JSON SETTINGS max_threads = 2, "
                   "session_timezone = 'Europe/Paris', readonly = 1")
    sql = build_sql(inspect("SELECT 1"), "db", {}, tag="42'")
    assert sql == "USE `db`; SELECT 1 SETTINGS log_comment = '42\\'', readonly = 1"


def test_error_text_is_normalised() -> None:
    nested = ("Code: 73. DB::Exception: Code: 73. DB::Exception: Unknown format Nope. Maybe you meant: "
              "['One','Npy']. (UNKNOWN_FORMAT) (version 26.9.2.1). (UNKNOWN_FORMAT) (version 26.9.2.1). "
              "(UNKNOWN_FORMAT)")
    e = QueryError.from_store(nested)
    assert (e.code, e.name, e.status) == (73, "UNKNOWN_FORMAT", 404)
    assert e.body() == ("Code: 73. DB::Exception: Unknown format Nope. "
                        "Maybe you meant: ['One','Npy']. (UNKNOWN_FORMAT)\n")
    assert QueryError.from_store("something odd").code == 1002


def test_decompress_bounds_output() -> None:
    assert decompress(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    with pytest.raises(QueryError) as info:
        decompress(gzip.compress(b"a" * 100), "gzip", 10)
    assert info.value.status == 413
    with pytest.raises(QueryError):
        decompress(gzip.compress(b"abc")[:-6], "gzip", 10)
