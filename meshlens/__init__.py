"""meshlens: an observability-first service mesh and tracing pipeline.

One import name. The shared cores live here (mesh.py: the mesh model; config.py and
yamlfile.py: configuration; protocols/: the I/O-free protocol codecs); the parts are
subpackages (meshlens.collector, .proxy, .tap, .analysis, .dashboards), each in its own
top-level folder of the repository; cli/ and demo/ are the composition root, which
nothing imports. docs/ARCHITECTURE.md is the map.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshlens")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
