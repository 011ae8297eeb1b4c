"""Build every dashboard's JSON from its definition; `python -m meshlens.dashboards.build` rewrites dashboards/json/."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshlens.dashboards import JSON_DIR
from meshlens.dashboards.dryrun import dryrun
from meshlens.dashboards.mesh import edge, overview, service
from meshlens.dashboards.readiness import readiness
from meshlens.dashboards.selfmon import selfmon
from meshlens.dashboards.traces import traces

BUILDERS: tuple[Callable[[], dict[str, Any]], ...] = (overview, service, edge, dryrun, traces, readiness,
                                                       selfmon)


def build_all() -> dict[str, dict[str, Any]]:
    """uid -> dashboard, in menu order."""
    return {d["uid"]: d for d in (b() for b in BUILDERS)}


def render(dash: dict[str, Any]) -> str:
    """The file text: stable key order is the definition's, two-space indent, trailing newline."""
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {f"{uid}.json": render(d) for uid, d in build_all().items()}
    for stale in directory.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    paths = []
    for name, text in wanted.items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def main() -> int:
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else JSON_DIR):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
