"""`meshlens recommend --apply | --diff`: the recommendations stored in the control plane as dry-run."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from meshlens.cli.errors import UserError

SOURCE = "meshlens recommend"


def apply_recommendations(args: argparse.Namespace) -> int:
    from meshlens.analysis.proposal import KINDS, Conflict, plan, proposals
    from meshlens.analysis.recommend import recommend
    from meshlens.cli.analysis_cmd import _scoped
    from meshlens.control.client import ControlClient, ControlError, control_url
    from meshlens.mesh import MeshError, parse
    from meshlens.policy.resources import mode_resource

    try:
        client = ControlClient(control_url(args.control), token=args.token, ca=args.ca)
        stored_mesh = _get(client, "Mesh", "mesh")
        if stored_mesh is None:
            raise UserError(f"the control plane at {client.url} holds no mesh: apply one first "
                            f"(meshlens apply -f mesh.yaml)")
        try:
            services = parse(stored_mesh["spec"]).services
        except MeshError as e:
            raise UserError(f"the control plane's mesh does not read: {e}") from None
        if args.service is not None and args.service not in services:
            raise UserError(f"the control plane's mesh does not define {args.service!r} (its services: "
                            f"{', '.join(sorted(services))}); nothing applied")

        def build(store: Any, window: Any, service: str | None) -> tuple[Any, dict]:
            from meshlens.analysis.scope import open_scope

            scope = open_scope(store, window, service)
            report = recommend(store, window, service, scope=scope)
            return report, proposals(report, scope, {name: s.namespace for name, s in services.items()})

        report, props = _scoped(args, build)
        stored = {}
        for kind in KINDS:
            for item in client.get(kind)["items"]:
                stored[(kind, item["name"])] = item["doc"]
        modes = client.modes()["modes"]
        try:
            todo = plan(props, stored, modes, set(services), lambda s, m: mode_resource(s, m).doc)
        except Conflict as e:
            raise UserError(str(e)) from None
        for p in props.values():
            for why in p.skipped:
                print(f"not written: {p.service}: {why}", file=sys.stderr)
        if not todo.documents:
            for line in todo.said:
                print(line)
            print("nothing to apply: the control plane already holds these recommendations"
                  if todo.said else f"no policy to apply: no recommendation of {report.window} has one")
            return 0
        text = yaml.safe_dump_all(todo.documents, sort_keys=False)
        if args.diff:
            out = client.apply([(SOURCE, text)], "", dry_run=True)
            for line in todo.said:
                print(f"would: {line}")
            _print_diff(out["results"])
            return 1
        reason = args.reason or f"{SOURCE}: window {report.window}, n={report.n} calls"
        out = client.apply([(SOURCE, text)], reason)
    except ControlError as e:
        raise UserError(str(e)) from None
    for r in out["results"]:
        for w in r["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    for line in todo.said:
        print(line)
    print(f"applied at revision {out['revision']}: see what dry-run records with meshlens dryrun report SERVICE")
    return 0


def _get(client: Any, kind: str, name: str) -> dict[str, Any] | None:
    from meshlens.control.client import ControlError

    try:
        return client.get(kind, name)["doc"]
    except ControlError as e:
        if e.status == 404:
            return None
        raise


def _print_diff(results: list[dict[str, Any]]) -> None:
    from meshlens.cli.control_cmd import write_diff

    for r in results:
        if r["action"] != "unchanged":
            write_diff(r)
