"""``guard demo`` over REST: the trimmed side-by-side JSON, and the whole demo as a process.

The process test runs ``python -m guard demo`` as a user does: the real backend (TensorFlow,
the seed models, TF Serving's REST API) and the real guard, then reads what it printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guard.dev.demo import rest

REPO = Path(__file__).resolve().parents[3]


def test_request_body_row_and_columnar() -> None:
    one = {"features": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    assert json.loads(rest.request_body(one)) == {"instances": [[1.0, 2.0], [3.0, 4.0]]}
    assert json.loads(rest.request_body(one, columnar=True)) == {
        "inputs": {"features": [[1.0, 2.0], [3.0, 4.0]]}
    }
    two = {"wide": np.array([[1.0], [2.0]]), "deep": np.array([[[5.0]], [[6.0]]])}
    assert json.loads(rest.request_body(two)) == {
        "instances": [{"wide": [1.0], "deep": [[5.0]]}, {"wide": [2.0], "deep": [[6.0]]}]
    }


def test_trim_keeps_the_first_rows_and_values_and_counts_the_rest() -> None:
    body = {"predictions": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]}
    text = "\n".join(rest.render(rest.trim(body), width=200))
    assert text == '{"predictions": [[0.1, 0.2, …+2], [0.5, 0.6, …+2], …+1]}'
    short = {"outputs": {"a": [1, 2], "b": "x"}}
    assert rest.trim(short) == short


def test_render_breaks_what_does_not_fit_and_stays_json() -> None:
    value = {"predictions": [[0.25], [0.75]], "guard_outputs": [{"p_class": [0]}, {"p_class": [1]}]}
    lines = rest.render(value, width=30)
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    assert json.loads("\n".join(lines)) == value
    assert rest.render(value, width=200) == [json.dumps(value)]


def test_side_by_side_aligns_the_right_column() -> None:
    text = rest.side_by_side(["raw", "{}"], ["guarded", "{", "}"])
    assert text.splitlines() == ["raw | guarded", "{}  | {", "    | }"]


def _models_dir() -> Path:
    return Path(os.environ.get("GUARD_TEST_MODELS_DIR", REPO / ".cache" / "models"))


def _block(output: str, model: str) -> str:
    """The REST block of one model: from its header to the next blank line."""
    start = output.index(f"{model} over REST")
    return output[start : output.index("\n\n", start)]


@pytest.mark.slow
@pytest.mark.tf
def test_guard_demo_shows_rest_raw_beside_guarded(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guard", "demo", "--models-dir", str(_models_dir())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout

    # wide_deep: the seed's 1.00285 on the raw side, clamped to 1.0 on the guarded side,
    # the derived class and label per instance under guard_outputs (one unnamed output).
    wide = _block(out, "wide_deep")
    assert re.search(
        r"row format\): HTTP 200 -> 200, x-guard-action=clamped x-guard-violations=[1-9]", wide
    )
    raw_side = "\n".join(line.split(" | ")[0] for line in wide.splitlines()[2:])
    guarded_side = "\n".join(line.split(" | ", 1)[-1] for line in wide.splitlines()[2:])
    assert "[[1.00285]," in raw_side and "guard_outputs" not in raw_side
    assert '"predictions": [[1.0], [1.0],' in guarded_side
    assert '"output_1_label": ["YES"]' in guarded_side

    # binary_mlp, columnar: guard_outputs is an object of arrays; nothing clamped (observe).
    binary = _block(out, "binary_mlp")
    assert "columnar format): HTTP 200 -> 200, x-guard-action=clean" in binary
    assert '"probability_label": [["negative"], ["positive"], …+8]' in binary

    # softmax_201: winner, score, label and top-k per instance; raw rows trimmed.
    softmax = _block(out, "softmax_201")
    assert "…+199]" in softmax and '"probabilities_label": "' in softmax
    assert '"probabilities_top_k_label": [' in softmax
