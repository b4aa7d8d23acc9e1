"""``guard check --upstream`` against the local backend serving the seed
models, as TF Serving reports TF2 SavedModels (``__saved_model_init_op``
among their signatures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLE_CONFIG, REPO_ROOT, BackendFactory

pytestmark = [pytest.mark.tf, pytest.mark.slow]


def _check(config: Path, upstream: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guard", "check", "--config", str(config), "--upstream", upstream],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "config", [EXAMPLE_CONFIG, REPO_ROOT / "deploy" / "k8s" / "base" / "guard.yaml"]
)
def test_the_shipped_configs_pass_against_the_seed_models(
    backends: BackendFactory, config: Path
) -> None:
    """Found (a red-team pass): every rule failed against TF's internal
    __saved_model_init_op signature, so the documented pre-flight check
    exited 2 on the project's own configs."""
    out = _check(config, backends("typed").address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_what_every_call_would_fail_on_is_reported(
    backends: BackendFactory, tmp_path: Path
) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text(
        "models:\n"
        "  - name: softmax_201\n"
        "    outputs:\n"
        "      - {name: probabilities, argmax: true, labels: [a, b]}\n"
        "      - {name: missing}\n"
        "  - name: binary_mlp\n"
        "    outputs:\n"
        "      - {name: probability, activation: softmax, top_k: 3}\n"
    )
    out = _check(config, backends("typed").address)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout
    assert (
        "output 'probabilities': in signature 'serving_default': 2 labels configured "
        "but the output has 201 classes" in text
    ), text
    assert "output 'missing': no signature has it; they have 'serving_default': " in text, text
    assert (
        "output 'probability': in signature 'serving_default': activation: softmax over "
        "one class" in text
    ), text
    assert "top_k is 3 but the output has 1 classes" in text, text
    assert "__saved_model_init_op" not in text, text
