"""The architecture, checked: what each layer may import, how long a function
may be, and that the README's module map names every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUARD = REPO / "guard"
MAX_FUNCTION_LINES = 50


def _imported_after(statement: str, roots: set[str]) -> list[str]:
    """Which of ``roots`` a fresh interpreter has imported after ``statement``."""
    code = (
        f"import sys; {statement}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(roots)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return list(ast.literal_eval(out.stdout.strip()))


def test_the_data_plane_imports_no_transport_and_no_metrics_library() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in (GUARD / "dataplane").rglob("*.py")
    )
    statement = "; ".join(f"import {m}" for m in modules)
    assert _imported_after(statement, {"grpc", "aiohttp", "prometheus_client", "tensorflow"}) == []


def test_the_workers_supervisor_imports_neither_the_proxy_nor_numpy() -> None:
    statement = "import guard.control.workers"
    assert _imported_after(statement, {"grpc", "numpy", "tensorflow"}) == []


def test_the_proxy_process_never_imports_tensorflow() -> None:
    statement = "import guard.cli, guard.control.app, guard.server.proxy"
    assert _imported_after(statement, {"tensorflow", "tf_keras", "keras"}) == []


def _functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted(GUARD.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                found.append((f"{path.relative_to(REPO)}:{node.lineno} {node.name}", lines))
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    long = [f"{where} ({n} lines)" for where, n in _functions() if n > MAX_FUNCTION_LINES]
    assert long == [], f"split these along the steps they name: {long}"


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(REPO))
        for p in GUARD.rglob("*")
        if p.suffix in (".py", ".c")
        and p.name not in ("__init__.py", "__main__.py", "_version.py")
        and "__pycache__" not in p.parts
        and p.parent.name not in ("backend", "models", "demo")
    ),
)
def test_the_readme_module_map_names_every_module(path: str) -> None:
    readme = (REPO / "README.md").read_text()
    assert f"`{path}`" in readme, f"add {path} to the README's module map"
