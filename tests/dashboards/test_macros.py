"""Transcripts of the expander (tests/dashboards/macros.py) against the plugin's documented expansions."""
from __future__ import annotations

import pytest

from tests.dashboards.macros import (ALL, MacroError, TimeRange, Variable, conditional_all, expand, expand_macros,
                                     interpolate)

# The plugin README's example range: 2014-11-12T11:45:26.123Z .. 2015-11-12T11:45:26.456Z, interval 20 s.
DOC = TimeRange(1415792726123, 1447328726456, 20_000)
DOC_MS = TimeRange(1415792726123, 1447328726456, 20)


@pytest.mark.parametrize("sql, expected", [
    ("$__timeFilter(columnName)", "columnName >= toDateTime(1415792726) AND columnName <= toDateTime(1447328726)"),
    ("$__timeFilter_ms(columnName)",
     "columnName >= fromUnixTimestamp64Milli(1415792726123) AND columnName <= fromUnixTimestamp64Milli(1447328726456)"),
    ("$__dateFilter(columnName)", "columnName >= toDate('2014-11-12') AND columnName <= toDate('2015-11-12')"),
    ("$__dateTimeFilter(dateColumn, timeColumn)",
     "(dateColumn >= toDate('2014-11-12') AND dateColumn <= toDate('2015-11-12')) AND "
     "(timeColumn >= toDateTime(1415792726) AND timeColumn <= toDateTime(1447328726))"),
    ("$__dt(dateColumn, timeColumn)",
     "(dateColumn >= toDate('2014-11-12') AND dateColumn <= toDate('2015-11-12')) AND "
     "(timeColumn >= toDateTime(1415792726) AND timeColumn <= toDateTime(1447328726))"),
    ("$__fromTime", "toDateTime(1415792726)"),
    ("$__toTime", "toDateTime(1447328726)"),
    ("$__fromTime_ms", "fromUnixTimestamp64Milli(1415792726123)"),
    ("$__toTime_ms", "fromUnixTimestamp64Milli(1447328726456)"),
    ("$__timeInterval(columnName)", "toStartOfInterval(toDateTime(columnName), INTERVAL 20 second)"),
    ("$__interval_s", "20"),
])
def test_documented_expansions(sql: str, expected: str) -> None:
    assert expand_macros(sql, DOC) == expected


def test_time_interval_ms_documented() -> None:
    assert (expand_macros("$__timeInterval_ms(columnName)", DOC_MS)
            == "toStartOfInterval(toDateTime64(columnName, 3), INTERVAL 20 millisecond)")


def test_interval_is_at_least_one() -> None:
    tr = TimeRange(0, 1000, 250)
    assert expand_macros("$__interval_s", tr) == "1"
    assert expand_macros("$__timeInterval(t)", tr) == "toStartOfInterval(toDateTime(t), INTERVAL 1 second)"


def test_a_shorter_macro_name_does_not_match_a_longer_one() -> None:
    # `\b` after the name: $__timeFilter never eats the start of $__timeFilter_ms.
    out = expand_macros("$__timeFilter(a) AND $__timeFilter_ms(b)", DOC)
    assert out == ("a >= toDateTime(1415792726) AND a <= toDateTime(1447328726) AND "
                   "b >= fromUnixTimestamp64Milli(1415792726123) AND b <= fromUnixTimestamp64Milli(1447328726456)")


def test_nested_parentheses_in_an_argument() -> None:
    assert (expand_macros("$__timeInterval(toDateTime(t))", DOC)
            == "toStartOfInterval(toDateTime(toDateTime(t)), INTERVAL 20 second)")


def test_a_macro_without_arguments_swallows_up_to_the_next_parenthesis_pair() -> None:
    # sqlutil scans forward for '(' past other text: the whole span becomes the macro.
    assert expand_macros("count() / $__interval_s AS r FROM t WHERE f(x) = 1", DOC) == "count() / 20 = 1"
    # ... unless a ')' comes first, which is why the dashboards write ($__interval_s).
    assert expand_macros("count() / ($__interval_s) AS r FROM t WHERE f(x) = 1", DOC) == \
        "count() / (20) AS r FROM t WHERE f(x) = 1"


def test_wrong_argument_counts_are_errors() -> None:
    with pytest.raises(MacroError, match="expected 1 argument, received 2"):
        expand_macros("$__timeFilter(a, b)", DOC)
    with pytest.raises(MacroError, match="expected 2 arguments, received 1"):
        expand_macros("$__dateTimeFilter(a)", DOC)


def test_sdk_defaults_table_column_time_from_to() -> None:
    assert expand_macros("SELECT $__column FROM $__table", DOC, table="calls", column="time") == \
        "SELECT time FROM calls"
    assert expand_macros("$__timeFrom(t)", DOC) == "t >= '2014-11-12T11:45:26Z'"
    assert expand_macros("$__timeTo(t)", DOC) == "t <= '2015-11-12T11:45:26Z'"


# --- $__conditionalAll -----------------------------------------------------------------

def test_conditional_all_keeps_the_condition_for_a_selection() -> None:
    v = {"bar": Variable("bar", ["val1", "val2"], ["val1", "val2", "val3"])}
    assert conditional_all("select foo from table where $__conditionalAll(bar in ($bar), $bar);", v) == \
        "select foo from table where bar in ($bar);"


@pytest.mark.parametrize("value", [ALL, [ALL], ""])
def test_conditional_all_is_1_eq_1_for_all_or_empty(value: str | list[str]) -> None:
    v = {"bar": Variable("bar", value, ["a", "b"])}
    assert conditional_all("select foo from table where $__conditionalAll(bar in ($bar), $bar);", v) == \
        "select foo from table where 1=1;"


def test_conditional_all_with_nested_parentheses_and_several_uses() -> None:
    v = {"a": Variable("a", ALL, ["x"]), "b": Variable("b", "y", ["y"])}
    sql = "WHERE $__conditionalAll(f(c, d) IN ($a), $a) AND $__conditionalAll(e IN (g($b)), $b)"
    assert conditional_all(sql, v) == "WHERE 1=1 AND e IN (g($b))"


# --- Grafana's interpolation with the plugin's format ---------------------------------

SERVICES = Variable("service", ["web", "api"], ["web", "api", "db"])


@pytest.mark.parametrize("sql, expected", [
    ("IN ($service)", "IN ('web','api')"),
    ("IN (${service})", "IN ('web','api')"),
    ("IN ([[service]])", "IN ('web','api')"),
    ("IN (${service:singlequote})", "IN ('web','api')"),
    ("IN (${service:doublequote})", 'IN ("web","api")'),
    ("'${service:csv}'", "'web,api'"),
    ("${service:pipe}", "web|api"),
    ("?${service:queryparam}", "?var-service=web&var-service=api"),
    ("$__timeFilter(time) AND $unknown", "$__timeFilter(time) AND $unknown"),
])
def test_multi_value(sql: str, expected: str) -> None:
    assert interpolate(sql, {"service": SERVICES}) == expected


def test_single_value_is_raw_unless_formatted() -> None:
    v = {"s": Variable("s", "o'brien")}
    assert interpolate("x = '$s'", v) == "x = 'o'brien'"
    assert interpolate("x = ${s:singlequote}", v) == "x = 'o\\'brien'"
    assert interpolate("x = ${s:sqlstring}", v) == "x = 'o''brien'"


def test_all_value_is_every_option_or_the_custom_all_value() -> None:
    every = Variable("service", ALL, [ALL, "web", "api"])
    assert interpolate("IN (${service:singlequote})", {"service": every}) == "IN ('web','api')"
    assert interpolate("IN ($service)", {"service": every}) == "IN ('web','api')"
    custom = Variable("service", [ALL], ["web", "api"], all_value=".*")
    assert interpolate("match(s, '${service:singlequote}')", {"service": custom}) == "match(s, '.*')"


def test_the_whole_pipeline() -> None:
    v = {"service": Variable("service", [ALL], ["web", "api"]), "database": Variable("database", "meshlens")}
    sql = ("SELECT $__timeInterval(time) AS time, count() / ($__interval_s) FROM ${database}.calls "
           "WHERE $__timeFilter(time) AND $__conditionalAll(dst_service IN (${service:singlequote}), $service)")
    assert expand(sql, v, DOC) == (
        "SELECT toStartOfInterval(toDateTime(time), INTERVAL 20 second) AS time, count() / (20) FROM meshlens.calls "
        "WHERE time >= toDateTime(1415792726) AND time <= toDateTime(1447328726) AND 1=1")
