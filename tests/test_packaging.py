"""One import name: what `pip install meshlens` puts into an environment.

The repository keeps its top-level folders (collector/, proxy/, …) but they install as
subpackages of `meshlens`; a user's environment gets one new top-level name, never
`proxy` or `analysis`. Checked on the installed distribution's metadata and on a wheel
built from the tree, whose file list is what a user really gets.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest

import meshlens
from tests.test_layers import FOLDERS, ROOT, SOURCES

# The installed one, in site-packages: a source tree on sys.path may hold a meshlens.egg-info of its own.
(DIST,) = [d for d in distributions(path=[sysconfig.get_paths()["purelib"]]) if d.metadata["Name"] == "meshlens"]


def test_the_installed_distribution_has_one_top_level_name() -> None:
    assert (DIST.read_text("top_level.txt") or "").split() == ["meshlens"]


def test_each_folder_imports_under_meshlens() -> None:
    import importlib

    for folder, package in FOLDERS.items():
        mod = importlib.import_module(package)
        assert Path(mod.__file__).resolve().parent == ROOT / folder


def test_version_is_the_distributions() -> None:
    assert meshlens.__version__ == DIST.version
    done = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"meshlens {DIST.version}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the tree (building in place would leave build/ behind)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tree's files")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # --no-build-isolation: the venv's own setuptools (a dev dependency), no registry needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "out"), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "out").glob("meshlens-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_meshlens(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = f"meshlens-{DIST.version}.dist-info"
    assert tops == {"meshlens", dist_info}
    assert wheel.read(f"{dist_info}/top_level.txt").decode().split() == ["meshlens"]


def test_the_wheel_holds_every_source_file(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    want = {f"{FOLDERS[p.relative_to(ROOT).parts[0]].replace('.', '/')}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
            for p in SOURCES}
    assert want - names == set(), "a package is missing from pyproject.toml's [tool.setuptools] packages"
    dashboards = {n for n in names if n.startswith("meshlens/dashboards/json/") and n.endswith(".json")}
    assert len(dashboards) == len(list((ROOT / "dashboards" / "json").glob("*.json"))) > 0
    console = {n.rsplit("/", 1)[1] for n in names if n.startswith("meshlens/control/console/static/")}
    assert console == {p.name for p in (ROOT / "control" / "console" / "static").iterdir()}  # the page's files
