"""ClickHouse's HTTP query interface without I/O: what a request asks, which statements may run, errors.

Read-only is enforced twice. First, ClickHouse's own parser normalises the statement
(formatQuerySingleLine: one statement, comments gone) and the normal form is checked
here (`inspect`): only SELECT/WITH/SHOW/DESCRIBE/EXISTS/EXPLAIN, no INTO OUTFILE, no
function reaching files, processes or the network. Then the normal form, not the
client's text, runs with `readonly = 1` (`build_sql`), which also refuses every table
function ClickHouse does not mark safe for read-only users.
The endpoint around this (sockets, threads, the store) is query_http.py.
"""
from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:  # Python 3.14 ships zstd; before that only the backport, when installed.
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    try:
        from backports import zstd  # type: ignore[no-redef]
    except ImportError:
        zstd = None
try:  # installed with clickhouse-driver[lz4]; clickhouse-connect asks for it first
    import lz4.frame as lz4_frame
except ImportError:
    lz4_frame = None

# ClickHouse's http_max_uri_size default; also caps the body. chdb still applies
# its own max_query_size (256 KiB) to the text it parses.
MAX_QUERY_BYTES = 1 << 20
# A query holds one of the max_concurrent_queries slots and CPU the collector shares with
# ingestion: bound it unless the client sends its own max_execution_time (ClickHouse's
# default is unlimited).
DEFAULT_MAX_EXECUTION_TIME = 60
# ClickHouse's http_zlib_compression_level default.
DEFAULT_COMPRESSION_LEVEL = 3

DEFAULT_FORMAT = "TabSeparated"
READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
# Functions and table functions that read files, run programs or open connections.
# `file` and `eval` work even under readonly = 1, so this list is the only guard for them.
BLOCKED_FUNCTIONS = frozenset({
    "file", "filecluster", "filesystem", "eval", "url", "urlcluster", "remote", "remotesecure",
    "cluster", "clusterallreplicas", "executable", "python", "catboostevaluate", "mysql",
    "postgresql", "mongodb", "redis", "sqlite", "odbc", "jdbc", "bigquery", "ytsaurus", "gcs",
    "oss", "cosn", "input",
})
BLOCKED_FUNCTION_PREFIXES = ("s3", "hdfs", "azure", "iceberg", "deltalake", "hudi", "paimon", "arrowflight")
# URL parameters applied as settings. Others are handled (query, database, default_format,
# query_id, user, password, compress, decompress, enable_http_compression,
# http_zlib_compression_level, param_*) or ignored: sessions, progress headers, wait_end_of_query
# and buffer_size (results are always buffered whole), client_protocol_version (Native is
# written as for protocol 0, which clients probe for), readonly (always 1), other settings.
ALLOWED_SETTINGS = frozenset({
    "date_time_output_format", "date_time_input_format", "cast_string_to_dynamic_use_inference",
    "session_timezone", "max_execution_time", "timeout_overflow_mode", "max_result_rows",
    "max_result_bytes", "result_overflow_mode", "max_rows_to_read", "max_bytes_to_read",
    "read_overflow_mode", "max_threads", "max_block_size", "max_memory_usage", "extremes",
    "join_use_nulls", "limit", "offset", "precise_float_parsing",
})
ALLOWED_SETTING_PREFIX = "output_format_"
DENIED_SETTINGS = frozenset({"output_format_schema"})  # writes a file

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp); others are 500,
# TOO_MANY_SIMULTANEOUS_QUERIES (202) among them.
_HTTP_STATUS: dict[int, int] = {
    194: 401,
    **dict.fromkeys((192, 193, 497, 512, 516), 403),
    **dict.fromkeys((6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223,
                     321, 376, 427, 441, 675, 676), 400),
    **dict.fromkeys((46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511), 404),
    229: 413, 48: 501, 76: 503, 209: 503, 439: 503, 381: 411, 159: 408, 779: 415,
}


class QueryError(Exception):
    """A refusal in ClickHouse's terms: code, name and message; the HTTP status follows from the code."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code, self.name, self.message = code, name, message.rstrip(". ")

    @property
    def status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    def body(self) -> str:
        return f"Code: {self.code}. DB::Exception: {self.message}. ({self.name})\n"

    @classmethod
    def from_store(cls, text: str) -> QueryError:
        """Parse chdb's first error line, dropping nested repeats, version trailers and our wrapper."""
        m = re.match(r"Code: (\d+)\. DB::Exception: (.*)", text, re.S)
        if not m:
            return cls(1002, "UNKNOWN_EXCEPTION", text)
        code, rest = int(m.group(1)), m.group(2)
        names = re.findall(r"\(([A-Z][A-Z0-9_]+)\)\s*$", rest)
        name = names[0] if names else "SYNTAX_ERROR" if code == 62 else "UNKNOWN_EXCEPTION"  # line cut short
        rest = re.sub(r"^(?:Code: \d+\. DB::Exception: )+", "", rest)
        rest = re.sub(r"(?: \([A-Z][A-Z0-9_]*\))? \(version [^)]*\)\.?", "", rest)
        rest = re.sub(r":? In scope SELECT formatQuerySingleLine\(.*", "", rest, flags=re.S)
        rest = re.sub(r"\s*\([A-Z][A-Z0-9_]*\)\s*$", "", rest)
        return cls(code, name, rest.strip())


def _readonly(message: str) -> QueryError:
    return QueryError(164, "READONLY", f"Cannot execute query in readonly mode: {message}")


# --- the statement, as ClickHouse normalised it ---------------------------------------

_TOKEN = re.compile(r"""'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_$]*|\S""", re.S)


@dataclass(frozen=True)
class Statement:
    """A statement that passed the checks: ClickHouse's normal form (what runs) and its FORMAT, if any."""

    text: str
    output_format: str | None


def inspect(normal: str) -> Statement:
    """Check a normalised statement (formatQuerySingleLine output) and find its FORMAT clause."""
    tokens = _TOKEN.findall(normal)
    words = [t.upper() if t[0].isalpha() or t[0] == "_" else "" for t in tokens]
    first = next((w for w, t in zip(words, tokens) if t != "("), "")
    if first not in READ_STATEMENTS:
        raise _readonly(f"{first or 'this'} statements are not allowed, only "
                        "SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN")
    depth, fmt_at = 0, -1
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif nxt == "(" and tok[0] != "'":
            name = tok.strip('`"')
            if name.lower() in BLOCKED_FUNCTIONS or name.lower().startswith(BLOCKED_FUNCTION_PREFIXES):
                raise _readonly(f"function {name}() reaches outside the database")
        elif words[i] == "INTO" and nxt.upper() == "OUTFILE":
            raise QueryError(358, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        elif words[i] == "PARALLEL" and nxt.upper() == "WITH":
            raise _readonly("PARALLEL WITH runs several statements")
        elif depth == 0 and tok == "FORMAT" and nxt and nxt[0] not in "'(":
            fmt_at = i
    fmt = None
    if fmt_at >= 0 and (fmt_at + 2 == len(tokens) or tokens[fmt_at + 2] == "SETTINGS"):
        fmt = tokens[fmt_at + 1].strip('`"')
        if fmt_at + 2 < len(tokens):
            raise _readonly("settings cannot be changed in the query; pass them as URL parameters")
    return Statement(normal, fmt)


_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\0", "\\0") + "'"


def quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def build_sql(stmt: Statement, database: str, settings: Mapping[str, str], tag: str = "") -> str:
    """USE the database, then run the statement with the allowed settings, its tag and readonly = 1 last."""
    pairs = [f"{k} = {v if _NUMBER.fullmatch(v) else quote_string(v)}" for k, v in settings.items()]
    if tag:
        pairs.append(f"log_comment = {quote_string(tag)}")
    return f"USE {quote_ident(database)}; {stmt.text} SETTINGS {', '.join([*pairs, 'readonly = 1'])}"


def kill_sql(tags: list[str]) -> str:
    """Kill the statements tagged (log_comment) with these query ids, without waiting for them."""
    return (f"KILL QUERY WHERE Settings['log_comment'] IN ({', '.join(map(quote_string, tags))}) "
            "ASYNC")


# --- the request ------------------------------------------------------------------------

@dataclass(frozen=True)
class QueryRequest:
    """What a client asked for, from the URL parameters, headers and (decoded) body."""

    sql: str
    database: str | None
    default_format: str | None
    settings: dict[str, str]
    accept_encoding: str | None
    """The response encoding to use, if the client asked for one we can produce."""
    compression_level: int


def parse_request(params: Mapping[str, str], headers: Mapping[str, str], body: bytes) -> QueryRequest:
    """Apply ClickHouse's rules for where the query, database, format and settings come from."""
    if headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
        raise QueryError(48, "NOT_IMPLEMENTED", "external data and form-encoded queries are not supported")
    for flag in ("compress", "decompress"):
        if params.get(flag, "0") not in ("0", "false", ""):
            raise QueryError(48, "NOT_IMPLEMENTED", f"{flag}=1 (ClickHouse's native block compression) "
                             "is not supported; use HTTP compression (Accept-Encoding: gzip)")
    bound = sorted(k for k in params if k.startswith("param_"))
    if bound:
        raise QueryError(48, "NOT_IMPLEMENTED", f"query parameters ({', '.join(bound)}) are not supported")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise QueryError(36, "BAD_ARGUMENTS", "the request body is not UTF-8") from None
    url_query = params.get("query", "")
    sql = f"{url_query}\n{text}" if url_query and text else url_query or text
    if len(sql.encode()) > MAX_QUERY_BYTES:
        raise QueryError(229, "QUERY_IS_TOO_LARGE", f"query larger than {MAX_QUERY_BYTES} bytes")
    if not sql.strip():
        raise QueryError(62, "SYNTAX_ERROR", "Empty query")
    database = headers.get("X-ClickHouse-Database") or params.get("database") or None
    if "\0" in sql + (database or ""):
        raise QueryError(36, "BAD_ARGUMENTS", "NUL byte in the query or database name")
    settings = {"max_execution_time": str(DEFAULT_MAX_EXECUTION_TIME)}
    settings.update((k, v) for k, v in params.items() if _setting_allowed(k))
    level = params.get("http_zlib_compression_level", "")
    wants = params.get("enable_http_compression", "1") not in ("0", "false")
    return QueryRequest(
        sql=sql,
        database=database,
        default_format=headers.get("X-ClickHouse-Format") or params.get("default_format") or None,
        settings=settings,
        accept_encoding=choose_encoding(headers.get("Accept-Encoding", "")) if wants else None,
        compression_level=min(int(level), 9) if level.isdigit() and int(level) > 0 else DEFAULT_COMPRESSION_LEVEL,
    )


def _setting_allowed(name: str) -> bool:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in DENIED_SETTINGS:
        return False
    return name in ALLOWED_SETTINGS or name.startswith(ALLOWED_SETTING_PREFIX)


# --- HTTP compression ---------------------------------------------------------------------

# Our preference among what the client accepts (its order is not consulted, as in ClickHouse):
# the cheapest to produce first, since the endpoint usually serves loopback.
ENCODINGS: tuple[str, ...] = (("lz4",) if lz4_frame else ()) + (("zstd",) if zstd else ()) + ("gzip", "deflate")


def choose_encoding(accept: str) -> str | None:
    """The response Content-Encoding for an Accept-Encoding header, or None for identity."""
    weights: dict[str, float] = {}
    for part in accept.lower().split(","):
        name, _, opts = part.partition(";")
        q = re.search(r"q=([0-9]+(?:\.[0-9]*)?)", opts)
        weights[name.strip()] = float(q.group(1)) if q else 1.0
    return next((e for e in ENCODINGS if weights.get(e, weights.get("*", 0.0)) > 0), None)


def compress(data: bytes, encoding: str, level: int) -> bytes:
    if encoding == "lz4":
        return lz4_frame.compress(data)  # type: ignore[union-attr]
    if encoding == "zstd":
        return zstd.compress(data, level)  # type: ignore[union-attr]
    if encoding == "gzip":
        c = zlib.compressobj(level, wbits=31)
        return c.compress(data) + c.flush()
    return zlib.compress(data, level)  # ClickHouse's "deflate" is the zlib format


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Decode a request body by its Content-Encoding, refusing more than `limit` bytes of output."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder: Any = zlib.decompressobj(47)  # gzip or zlib, told apart by their headers
    elif encoding == "zstd" and zstd is not None:
        decoder = zstd.ZstdDecompressor()
    elif encoding == "lz4" and lz4_frame is not None:
        decoder = lz4_frame.LZ4FrameDecompressor()
    else:
        raise QueryError(89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown compression method: {encoding}")
    try:
        out, done = decoder.decompress(data, limit + 1), decoder.eof
    except Exception as e:  # zlib.error, RuntimeError from lz4, zstd's own (stdlib and backport differ)
        raise QueryError(271, "CANNOT_DECOMPRESS", f"cannot decode {encoding} request body: {e}") from None
    if len(out) > limit:
        raise QueryError(229, "QUERY_IS_TOO_LARGE", f"query larger than {limit} bytes")
    if not done:
        raise QueryError(271, "CANNOT_DECOMPRESS", f"truncated {encoding} request body")
    return out


# --- authentication ------------------------------------------------------------------------

def credentials(params: Mapping[str, str], headers: Mapping[str, str]) -> tuple[str, str] | None:
    """User and password from X-ClickHouse-User/Key, Basic auth or user/password parameters; None if absent."""
    by_header = headers.get("X-ClickHouse-User") or headers.get("X-ClickHouse-Key")
    auth = headers.get("Authorization")
    by_params = "user" in params or "password" in params
    if sum(map(bool, (by_header, auth, by_params))) > 1:
        raise _auth_failed("it is not allowed to use several authentication methods simultaneously")
    if by_header:
        return headers.get("X-ClickHouse-User", ""), headers.get("X-ClickHouse-Key", "")
    if auth:
        scheme, _, info = auth.partition(" ")
        if scheme.lower() != "basic":
            raise _auth_failed(f"'{scheme}' HTTP Authorization scheme is not supported")
        try:
            user, _, password = base64.b64decode(info.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _auth_failed("malformed Basic credentials") from None
        return user, password
    if by_params:
        return params.get("user", "default"), params.get("password", "")
    return None


def _auth_failed(reason: str) -> QueryError:
    return QueryError(516, "AUTHENTICATION_FAILED", f"Invalid authentication: {reason}")


def write_refusal(head: str) -> QueryError | None:
    """READONLY if a query we cannot run anyway plainly starts a write: a better message only."""
    m = re.match(r"(?:\s|--[^\n]*|/\*.*?\*/|\()*([A-Za-z]+)", head, re.S)
    word = m[1].upper() if m else "SELECT"
    return None if word in READ_STATEMENTS else _readonly(f"{word} statements are not allowed")


def header_safe(value: str) -> str:
    """A client-supplied value we may echo in a header: printable ASCII, bounded."""
    return value if len(value) <= 256 and re.fullmatch(r"[\x20-\x7e]*", value) else ""
