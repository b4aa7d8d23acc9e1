"""Helpers for the deployment tests: the generators under deploy/ are scripts, not
packages, so they are loaded by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.paths import DEPLOY


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dashboard_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module."""
    return _load("guard_deploy_dashboard", DEPLOY / "grafana" / "generate.py")


@pytest.fixture(scope="session")
def k8s_renderer() -> ModuleType:
    """deploy/k8s/render.py as a module."""
    return _load("guard_deploy_k8s_render", DEPLOY / "k8s" / "render.py")


@pytest.fixture(scope="session")
def prometheusrule_generator() -> ModuleType:
    """deploy/prometheus/make_prometheusrule.py as a module."""
    return _load("guard_deploy_prometheusrule", DEPLOY / "prometheus" / "make_prometheusrule.py")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package `prometheus`; `make apt` installs it)."""
    import shutil

    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's 'prometheus' package (make apt)"
    return path
