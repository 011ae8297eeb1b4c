"""Read a YAML file for a setting or definition, with errors that name the file and the line."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The document in `path`; unreadable or invalid files raise `error` with one line naming them."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
