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
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow; its text spans two lines
            problem = f"character #x{e.character:04x} at position {e.position} is not allowed"  # type: ignore[str-format]
        else:
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise error(f"{path}{where}: invalid YAML: {problem}") from None
