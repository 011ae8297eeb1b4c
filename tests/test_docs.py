"""The docs a newcomer reads: every link resolves inside the repository, every folder named exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FOLDER = re.compile(r"`([a-z_]+)/`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        assert "://" not in target, f"{doc.name} links outside the repository: {target}"
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"


def test_the_architecture_map_exists_and_the_readme_links_it() -> None:
    assert "](docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"], ids=lambda p: p.name)
def test_top_level_folders_named_exist(doc: Path) -> None:
    """A folder named (`name/`) exists somewhere in the tree, unless its line says it does not yet."""
    text = doc.read_text()
    folders = {p.name for p in ROOT.rglob("*") if p.is_dir() and ".git" not in p.parts and ".venv" not in p.parts}
    for name in set(FOLDER.findall(text)):
        if name not in folders:
            line = next(l for l in text.splitlines() if f"`{name}/`" in l)
            assert "does not exist yet" in line, f"{doc.name} names `{name}/`, which does not exist: {line.strip()}"
