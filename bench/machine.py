"""A description of the machine and software a benchmark ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version_of(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, str | int]:
    """CPU, cores, kernel and the versions that shape the numbers."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": _dist("grpcio"),
        "protobuf": _dist("protobuf"),
        "numpy": _dist("numpy"),
        "uvloop": _dist("uvloop"),
        "nginx": _version_of(["nginx", "-v"]).replace("nginx version: ", ""),
        "h2load": _version_of(["h2load", "--version"]),
        "loadavg_1m_at_start": f"{os.getloadavg()[0]:.1f}",
    }
