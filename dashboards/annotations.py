"""The control plane's changes (`mesh_changes`) as Grafana annotations, so a mode switch, a policy change or an
automatic rollback is marked on the traffic it changed.

Three queries, each its own colour and toggle in Grafana: mode switches, policy changes (every other
kind: the routing, traffic and security documents, and the mesh definition itself), and the guard's
automatic rollbacks, which are mode switches too but must stand out. A dashboard scopes them to the
service it shows: the changes about that service (a change's `service` lists every service it is
about, comma-separated) and those about no service in particular, which apply to all of them (the
mesh, a PeerAuthentication or AuthorizationPolicy without a selector). The table is read FINAL: a
change shipped twice is one row only after ClickHouse merges (collector/schema.py, migration 4).
"""
from __future__ import annotations

from typing import Any

from meshlens.dashboards.model import sql_annotation

CHANGES = "${database}.mesh_changes FINAL"
WINDOW = "$__timeFilter(time)"
# The guard's own name for its changes, and how its reasons begin: an automatic rollback is its switch of a
# service from enforce back to dry-run.
GUARD_WHO = "meshlens-guard"
GUARD_REASON = "guard:"
ROLLBACK = (f"(kind = 'Mode' AND who = '{GUARD_WHO}' AND startsWith(reason, '{GUARD_REASON}') "
            "AND from_mode = 'enforce' AND to_mode = 'dry-run')")
# A Mode stored with the mode already in force (created as observe) switches nothing.
MODE_SWITCH = f"(kind = 'Mode' AND from_mode != to_mode AND NOT {ROLLBACK})"
POLICY_CHANGE = "(kind != 'Mode')"
# Grafana draws every marker it gets; past this many in one range they are a wall of lines, not marks.
MAX_MARKS = 1000

COLORS = {"Mode switches": "blue", "Policy changes": "orange", "Automatic rollbacks": "red"}
BY_WHOM = ("concat(' by ', toString(who), ' (revision ', toString(revision), ')', "
           "if(reason != '', concat(': ', reason), ''))")
MODE_TEXT = f"concat(toString(name), ': ', toString(from_mode), ' -> ', toString(to_mode), {BY_WHOM})"
POLICY_TEXT = (f"concat(toString(kind), ' ', toString(name), ' ', toString(action), "
               f"if(service = '', ' (every service)', concat(' (', toString(service), ')')), {BY_WHOM})")
TAGS = "concat(toString(kind), if(service != '', concat(',', toString(service)), ''))"


def about(service: str) -> str:
    """SQL condition: the change is about `service` (a SQL expression: a quoted dashboard variable), or about no
    service in particular."""
    return f"(has(splitByChar(',', toString(service)), {service}) OR service = '')"


def _query(title: str, text: str, which: str, service: str) -> str:
    return f"""
SELECT time, '{title}' AS title, {text} AS text, {TAGS} AS tags
FROM {CHANGES}
WHERE {WINDOW} AND {about(service)} AND {which}
ORDER BY time LIMIT {MAX_MARKS}"""


def change_annotations(service: str) -> list[dict[str, Any]]:
    """The three annotation queries of a dashboard about `service` (e.g. "'${service}'")."""
    return [
        sql_annotation("Mode switches", _query("mode switch", MODE_TEXT, MODE_SWITCH, service),
                       COLORS["Mode switches"]),
        sql_annotation("Policy changes", _query("policy change", POLICY_TEXT, POLICY_CHANGE, service),
                       COLORS["Policy changes"]),
        sql_annotation("Automatic rollbacks", _query("automatic rollback", MODE_TEXT, ROLLBACK, service),
                       COLORS["Automatic rollbacks"]),
    ]
