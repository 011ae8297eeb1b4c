"""What Grafana and the ClickHouse plugin do to a panel's SQL before ClickHouse sees it, in three steps.

1. `$__conditionalAll(cond, $var)` — the plugin's frontend (datasource.ts
   applyConditionalAll): from the last occurrence backwards, the condition, or
   `1=1` when the variable's current value is '' or `$__all`.
2. Grafana's template interpolation (templateSrv.replace) of `$var`, `${var}`,
   `${var:format}` and `[[var]]`, with the plugin's own format function for
   values without an explicit format (a multi-value list becomes 'a','b'; a
   single value is inserted raw) and the All value (every option, or the
   variable's custom allValue inserted raw). Unknown names are left alone, which
   is how `$__timeFilter` and friends survive to step 3.
3. The plugin's backend macros (pkg/macros/macros.go), applied by
   grafana-plugin-sdk-go sqlutil.Interpolate together with its defaults
   ($__timeFrom, $__timeTo, $__timeGroup, $__table, $__column): each
   `$__name\\b` occurrence takes as arguments the text between the next
   parenthesis pair — found by scanning forward past any other text, unless a
   `)` comes first — split on commas and trimmed.

Written from the plugin's and the SDK's documented behaviour, as a test oracle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

ALL = "$__all"


class MacroError(ValueError):
    """A macro got the wrong number of arguments (the plugin answers the query with this error)."""


@dataclass
class Variable:
    """A dashboard variable's current state: value (one string or a list), options, All handling."""

    name: str
    value: str | list[str]
    options: list[str] = field(default_factory=list)
    all_value: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class TimeRange:
    """The panel's time range and interval, in milliseconds (as Grafana sends them to the backend)."""

    from_ms: int
    to_ms: int
    interval_ms: int = 20_000


# --- 1. $__conditionalAll (frontend) ---------------------------------------------------

_CONDITIONAL_ALL = "$__conditionalAll("


def _macro_args(query: str, open_index: int) -> list[str]:
    """The plugin's getMacroArgs: split at depth-1 commas until the parenthesis opened at open_index closes."""
    args: list[str] = []
    depth, last = 0, 1
    sub = query[open_index:]
    for m in re.finditer(r"[(),]", sub):
        ch, end = m.group(), m.end()
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 1:
            args.append(sub[last:end - 1])
            last = end
        if depth == 0:
            args.append(sub[last:end - 1])
            return args
    return []


def conditional_all(sql: str, variables: dict[str, Variable]) -> str:
    i = sql.rfind(_CONDITIONAL_ALL)
    while i != -1:
        params = _macro_args(sql, i + len(_CONDITIONAL_ALL) - 1)
        if len(params) != 2:
            return sql
        var = variables.get(params[1].strip()[1:])
        phrase = params[0]
        if var is not None:
            value = ",".join(var.value) if isinstance(var.value, list) else str(var.value)
            if value in ("", ALL):
                phrase = "1=1"
        sql = sql.replace(f"{_CONDITIONAL_ALL}{params[0]},{params[1]})", phrase, 1)
        i = sql.rfind(_CONDITIONAL_ALL)
    return sql


# --- 2. Grafana template variables -----------------------------------------------------

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


def _quote(values: list[str], q: str, escaped: str) -> str:
    return ",".join(q + v.replace(q, escaped) + q for v in values)


def _format(value: str | list[str], fmt: str | None, var: Variable) -> str:
    values = value if isinstance(value, list) else [value]
    if fmt is None:  # the ClickHouse plugin's format function
        return "'" + "','".join(values) + "'" if isinstance(value, list) else str(value)
    if fmt == "singlequote":
        return _quote(values, "'", "\\'")
    if fmt == "doublequote":
        return _quote(values, '"', '\\"')
    if fmt == "sqlstring":
        return _quote(values, "'", "''")
    if fmt in ("csv", "raw"):
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "queryparam":
        return "&".join(f"var-{var.name}={v}" for v in values)
    if fmt == "text":
        return var.text if var.text is not None else ",".join(values)
    raise ValueError(f"format {fmt!r} is not implemented here")


def _is_all(value: str | list[str]) -> bool:
    return value == ALL or (isinstance(value, list) and ALL in value)


def interpolate(sql: str, variables: dict[str, Variable]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        var = variables.get(name)
        if var is None:
            return m.group(0)
        value = var.value
        if _is_all(value):
            if var.all_value is not None and fmt not in ("text", "percentencode"):
                return var.all_value
            value = [o for o in var.options if o != ALL]
        return _format(value, fmt, var)

    return _VARIABLE.sub(one, sql)


# --- 3. backend macros -----------------------------------------------------------------

def _dt(ms: int) -> str:
    return f"toDateTime({ms // 1000})"


def _dt64(ms: int) -> str:
    return f"fromUnixTimestamp64Milli({ms})"


def _date(ms: int) -> str:
    return f"toDate('{datetime.fromtimestamp(ms / 1000, timezone.utc):%Y-%m-%d}')"


def _rfc3339(ms: int) -> str:
    return f"{datetime.fromtimestamp(ms // 1000, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def _need(args: list[str], n: int) -> None:
    if len(args) != n:
        raise MacroError(f"unexpected number of arguments: expected {n} argument{'s' if n > 1 else ''}, "
                         f"received {len(args)}")


def _macros(tr: TimeRange, table: str, column: str) -> dict[str, object]:
    f, t = tr.from_ms, tr.to_ms
    seconds = max(tr.interval_ms // 1000, 1)
    millis = max(tr.interval_ms, 1)

    def time_filter(a: list[str]) -> str:
        _need(a, 1)
        return f"{a[0]} >= {_dt(f)} AND {a[0]} <= {_dt(t)}"

    def time_filter_ms(a: list[str]) -> str:
        _need(a, 1)
        return f"{a[0]} >= {_dt64(f)} AND {a[0]} <= {_dt64(t)}"

    def date_filter(a: list[str]) -> str:
        _need(a, 1)
        return f"{a[0]} >= {_date(f)} AND {a[0]} <= {_date(t)}"

    def date_time_filter(a: list[str]) -> str:
        _need(a, 2)
        return f"({a[0]} >= {_date(f)} AND {a[0]} <= {_date(t)}) AND ({a[1]} >= {_dt(f)} AND {a[1]} <= {_dt(t)})"

    def time_interval(a: list[str]) -> str:
        _need(a, 1)
        return f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {seconds} second)"

    def time_interval_ms(a: list[str]) -> str:
        _need(a, 1)
        return f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {millis} millisecond)"

    def time_from(a: list[str]) -> str:
        _need(a, 1)
        return f"{a[0]} >= '{_rfc3339(f)}'"

    def time_to(a: list[str]) -> str:
        _need(a, 1)
        return f"{a[0]} <= '{_rfc3339(t)}'"

    def time_group(a: list[str]) -> str:
        _need(a, 2)
        parts = ["year", "month", "day", "hour", "minute"]
        if a[1] not in parts:
            return ""
        return ",".join(f"datepart({p}, {a[0]})" for p in reversed(parts[:parts.index(a[1]) + 1]))

    return {
        "fromTime": lambda a: _dt(f), "toTime": lambda a: _dt(t),
        "fromTime_ms": lambda a: _dt64(f), "toTime_ms": lambda a: _dt64(t),
        "timeFilter": time_filter, "timeFilter_ms": time_filter_ms, "dateFilter": date_filter,
        "dateTimeFilter": date_time_filter, "dt": date_time_filter,
        "timeInterval": time_interval, "timeInterval_ms": time_interval_ms,
        "interval_s": lambda a: str(seconds),
        # grafana-plugin-sdk-go sqlutil defaults the plugin does not override
        "timeFrom": time_from, "timeTo": time_to, "timeGroup": time_group,
        "table": lambda a: table, "column": lambda a: column,
    }


def _matches(sql: str, name: str) -> list[tuple[str, str]]:
    """(macro text, argument text) per occurrence, scanning for parentheses as sqlutil does."""
    out = []
    for m in re.finditer(r"\$__" + re.escape(name) + r"\b", sql, re.ASCII):
        start = m.start()
        rest = sql[start:]
        depth, arg_start, end = 0, 0, 0
        for idx, ch in enumerate(rest):
            if depth == 0 and end > 0:
                break
            if ch == "(":
                depth += 1
                if arg_start == 0:
                    arg_start = idx + 1
            elif ch == ")":
                if depth == 0:
                    end = 0
                    break
                depth -= 1
                end = idx + 1
        if end == 0:
            end = m.end() - start
        text = rest[:end]
        args = rest[arg_start:end - 1] if arg_start > 0 else ""
        out.append((text, args))
    return out


def expand_macros(sql: str, tr: TimeRange, table: str = "", column: str = "") -> str:
    for name, fn in _macros(tr, table, column).items():
        for text, args in _matches(sql, name):
            result = fn([a.strip() for a in args.split(",")])  # type: ignore[operator]
            sql = sql.replace(text, result)
    return sql


def expand(sql: str, variables: dict[str, Variable], tr: TimeRange) -> str:
    """All three steps, in Grafana's order: the SQL ClickHouse receives."""
    return expand_macros(interpolate(conditional_all(sql, variables), variables), tr)
