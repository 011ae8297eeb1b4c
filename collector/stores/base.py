"""The one interface every ClickHouse backend implements, and what they share."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

import pyarrow as pa

# Oldest ClickHouse whose SQL we write: DateTime64, Map, LowCardinality, TTL,
# insert_deduplication_token, non_replicated_deduplication_window.
MIN_VERSION: tuple[int, int] = (23, 8)


class StoreError(Exception):
    """The store answered, but refused or failed the statement (a ClickHouse error)."""


class StoreUnavailable(StoreError):
    """The store could not be reached: callers spool and retry later."""


class UnsupportedServer(StoreError):
    """The server is older than MIN_VERSION."""


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:4])


class Store(ABC):
    """A ClickHouse database reached one way or another.

    Inserts take an Arrow table whose column names are the target columns and
    a deduplication token, so that replaying the same batch stores it once.
    Reads return rows (with column names) or an Arrow table.
    """

    url: str
    database: str
    cluster: str = ""

    @abstractmethod
    def command(self, sql: str, settings: dict[str, Any] | None = None) -> None:
        """Run a statement that returns nothing useful (DDL, ALTER, small INSERT)."""

    @abstractmethod
    def query_table(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a SELECT."""

    @abstractmethod
    def query_arrow(self, sql: str) -> pa.Table:
        """A SELECT's result as an Arrow table (what analysis turns into pandas)."""

    @abstractmethod
    def insert(self, table: str, data: pa.Table, token: str) -> None:
        """Insert `data` into `table`; a second insert with the same token is dropped."""

    @abstractmethod
    def use_database(self) -> None:
        """From now on, resolve unqualified table names in `self.database` (which must exist)."""

    def close(self) -> None:
        """Release connections."""

    def query_rows(self, sql: str) -> list[tuple]:
        return self.query_table(sql)[1]

    def server_version(self) -> str:
        return str(self.query_rows("SELECT version()")[0][0])

    def check_version(self) -> None:
        version = self.server_version()
        if parse_version(version)[:2] < MIN_VERSION:
            need = ".".join(map(str, MIN_VERSION))
            raise UnsupportedServer(
                f"ClickHouse {version} at {redact(self.url)} is too old: meshlens needs {need} or newer"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def first_line(error: BaseException | str, default: str = "ClickHouse error") -> str:
    """The first non-empty line of an error: ClickHouse messages carry stack traces after it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default


def in_sentence(text: str) -> str:
    """An OS or driver message ("Connection refused") as the tail of our line ("…: connection refused")."""
    return text[:1].lower() + text[1:]


def quote_ident(name: str) -> str:
    """`name` as a ClickHouse identifier; only plain names are accepted."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid identifier {name!r}: use letters, digits and _")
    return f"`{name}`"


def insert_columns_sql(table: str, data: pa.Table) -> str:
    cols = ", ".join(f"`{n}`" for n in data.column_names)
    return f"INSERT INTO {table} ({cols})"
