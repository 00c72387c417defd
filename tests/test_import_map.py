"""The shape of the house (STYLE.md): which package of service/ may import which, read from the source.

Imports go one way: api -> workers -> engine -> {models, expr} -> jobs -> base. ``base`` is every
module directly in service/ (errors, limits, tensorcodec...): anyone may import them. Every import
statement counts, also those inside functions or under TYPE_CHECKING. Importing service.api or
service.client leaves TensorFlow out (tests/api and tests/client/test_import_boundary.py check that
at run time); this test names the arrows themselves, so a new one is a decision, not an accident.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SERVICE = Path(ROOT) / "service"

# package -> the packages it may import (besides itself and base).
ALLOWED: dict[str, set[str]] = {
    "jobs": set(),  # job and result types and their one validation: plain data, below everything
    "expr": {"jobs"},  # text -> syntax tree (TF-free, the API's early checks) -> TF callable
    "models": {"jobs"},  # spec -> layout (TF-free) and Keras; losses, optimizers, objectives
    "engine": {"models", "expr", "jobs"},
    # The children load the engine by name (WorkerConfig.handler), so importing the pool stays TF-free.
    "workers": {"jobs"},
    "umbridge": {"expr", "jobs"},  # the UM-Bridge protocol: its models become GradientJobs
    "playground": set(),  # static files
    # The API refuses bad requests early with the TF-free parts of expr and models (parser,
    # program checks, layouts); it never imports the engine.
    "api": {"workers", "umbridge", "playground", "expr", "models", "jobs"},
    "client": set(),  # only base: the SDK runs without the server installed
    "cli": {"api", "client"},
}
# Modules of those packages that import TensorFlow or Keras: only the engine may import them.
TF_MODULES = (
    "service.engine",
    "service.models.keras_build",
    "service.models.objectives",
    "service.expr.compiler",
)


def _unit(module: str) -> str | None:
    """The package (or "base") a ``service.*`` module belongs to; None outside service."""
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2:
        return None
    return parts[1] if (SERVICE / parts[1]).is_dir() else "base"


def _imports(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _sources() -> dict[str, list[Path]]:
    units: dict[str, list[Path]] = {}
    for path in sorted(SERVICE.rglob("*.py")):
        top = path.relative_to(SERVICE).parts[0]
        units.setdefault(top if (SERVICE / top).is_dir() else "base", []).append(path)
    return units


def test_every_package_is_on_the_map() -> None:
    assert set(_sources()) - {"base"} == set(ALLOWED)


def test_the_arrows_go_one_way() -> None:
    graphlib.TopologicalSorter(ALLOWED).static_order()  # raises CycleError on a cycle


def test_each_package_imports_only_what_the_map_allows() -> None:
    wrong: list[str] = []
    for unit, paths in _sources().items():
        allowed = {unit, "base"} | ALLOWED.get(unit, set())
        for path in paths:
            for module in _imports(path):
                target = _unit(module)
                if unit == "base" and target not in (None, "base"):
                    wrong.append(f"{path.relative_to(ROOT)} (base) imports {module}")
                elif target is not None and target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} ({unit}) imports {module}")
                elif unit != "engine" and module.startswith(TF_MODULES) and not _is_tf(path):
                    wrong.append(f"{path.relative_to(ROOT)} ({unit}) imports {module}, a TensorFlow module")
    assert not wrong, "\n".join(wrong)


def _is_tf(path: Path) -> bool:
    """A TensorFlow module itself (keras_build may import the compiler's kin, and so on)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return module.startswith(TF_MODULES)


def test_jobs_import_neither_tensorflow_nor_the_web_stack() -> None:
    banned = ("tensorflow", "keras", "pydantic", "fastapi", "starlette")
    for path in _sources()["jobs"]:
        heavy = [m for m in _imports(path) if m.split(".")[0] in banned]
        assert not heavy, f"{path.relative_to(ROOT)} imports {heavy}"


def test_jobs_and_the_apis_early_checks_load_no_tensorflow() -> None:
    # A fresh interpreter: this test process may have imported TF for other tests.
    script = (
        "import sys, service.jobs, service.models.layout, service.expr.program\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'pydantic', 'fastapi'))) or 'clean')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
