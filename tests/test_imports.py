"""No module of chartsum loads llvmlite when imported.

vLLM's CPU worker is a spawned process that re-imports the parent's main
module; when that import loads llvmlite (bm25s imports numba), the worker
fails to start. Any chartsum module can be a program's main module, so none
may import bm25s, numba or llvmlite at its top level.
"""

from __future__ import annotations

import subprocess
import sys

PACKAGES = ["chartsum", "workers", "pipelines", "schemas", "benchmarks"]


def test_importing_every_module_leaves_llvmlite_unloaded() -> None:
    """Each package's modules, all imported in a fresh interpreter."""
    script = f"""
import importlib, pkgutil, sys
names = []
for package in {PACKAGES!r}:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
loaded = sorted(m for m in ("llvmlite", "numba", "bm25s") if m in sys.modules)
print(len(names), ",".join(loaded) or "none")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )

    count, loaded = result.stdout.split()
    assert int(count) > 40
    assert loaded == "none"
