"""What may import what: the layers of docs/ARCHITECTURE.md, checked on every module's imports.

The arrows point one way. The shared cores import nothing of ours but each other; the
collector only the shared cores; the producers (proxy, tap) the collector's record model
and client, never each other; analysis the collector; nothing imports the composition
root (meshlens.cli, meshlens.demo). Imports inside functions count as much as those at
the top: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"meshlens": "meshlens", "collector": "meshlens.collector", "proxy": "meshlens.proxy",
           "tap": "meshlens.tap", "analysis": "meshlens.analysis", "dashboards": "meshlens.dashboards",
           "control": "meshlens.control"}

# meshlens/__init__.py (the package itself, `import meshlens`) is shared too: see layer_of.
SHARED = ("meshlens.mesh", "meshlens.config", "meshlens.yamlfile", "meshlens.protocols", "meshlens.policy")
ROOTS = ("meshlens.cli", "meshlens.demo")
# What the producers may take from the collector: the record model, its columns and the client
# that ships batches; never the stores, the ingestion service or the schema.
COLLECTOR_FOR_PRODUCERS = ("meshlens.collector.record", "meshlens.collector.columns",
                           "meshlens.collector.batch_format", "meshlens.collector.client")

# layer -> the modules (prefixes) it may import besides itself
ALLOWED: dict[str, tuple[str, ...]] = {
    "shared": SHARED,
    "meshlens.collector": SHARED,
    "meshlens.proxy": SHARED + COLLECTOR_FOR_PRODUCERS,
    "meshlens.tap": SHARED + COLLECTOR_FOR_PRODUCERS,
    "meshlens.analysis": SHARED + ("meshlens.collector",),
    "meshlens.dashboards": SHARED + ("meshlens.collector",),
    "meshlens.control": SHARED + ("meshlens.collector", "meshlens.analysis"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if _under(module, ROOTS):
        return "root"
    if module == "meshlens":
        return "shared"
    for layer in ALLOWED:
        if layer.startswith("meshlens.") and _under(module, (layer,)):
            return layer
    assert _under(module, SHARED), f"{module} belongs to no layer: add it to tests/test_layers.py and the map"
    return "shared"


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a meshlens module in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _under(a.name, ("meshlens",))]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _under(node.module, ("meshlens",)):
            # `from meshlens import cli` imports meshlens.cli; `from meshlens import __version__` the
            # package itself; `from meshlens.x import f` imports meshlens.x
            found += [(node.lineno, _from_meshlens(a.name) if node.module == "meshlens" else node.module)
                      for a in node.names]
    return found


def _from_meshlens(name: str) -> str:
    sub = f"meshlens.{name}"
    return sub if sub in MODULES or sub in FOLDERS.values() else "meshlens"


def allowed(layer: str, own: str, imported: str) -> bool:
    if layer == "root" or imported == "meshlens":
        return True
    return _under(imported, (own,) + ALLOWED[layer]) and not _under(imported, ROOTS)




SOURCES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def test_every_folder_has_sources() -> None:
    assert {p.relative_to(ROOT).parts[0] for p in SOURCES} == set(FOLDERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    own = module if layer == "shared" else layer
    wrong = [f"line {line}: {imported}" for line, imported in our_imports(path) if not allowed(layer, own, imported)]
    assert not wrong, f"{module} (layer {layer}) imports above or beside itself: {wrong}"


def test_the_rules_catch_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: an analysis module importing the CLI, a proxy module importing the tap."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from meshlens.cli.query_cmd import run\n    import meshlens.tap.calls\n"
                   "from meshlens import demo\n")
    assert sorted(our_imports(bad)) == [(2, "meshlens.cli.query_cmd"), (3, "meshlens.tap.calls"), (4, "meshlens.demo")]
    assert not allowed("meshlens.proxy", "meshlens.proxy", "meshlens.tap.calls")
    assert not allowed("meshlens.analysis", "meshlens.analysis", "meshlens.cli.query_cmd")
    assert not allowed("meshlens.collector", "meshlens.collector", "meshlens.analysis.scope")
    assert not allowed("shared", "meshlens.mesh", "meshlens.collector.record")
    assert allowed("meshlens.proxy", "meshlens.proxy", "meshlens.collector.record")
    assert allowed("root", "meshlens.cli", "meshlens.demo.run")
    assert layer_of("meshlens.protocols.http1") == "shared"
    assert layer_of("meshlens.collector.stores.http") == "meshlens.collector"
