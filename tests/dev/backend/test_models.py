"""The seed models: layout, signatures, stories, determinism, the build cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from guard.control.config import load_config
from guard.dev.models import (
    LABELS_FILE,
    MODEL_NAMES,
    MODELS,
    VERSION,
    build_models,
    demo_inputs,
    keras_predict,
    labels,
    random_inputs,
    saved_model_predict,
)
from guard.dev.models._spec import BINARY_MLP_TARGETS, SOFTMAX_201_WINNERS, WIDE_DEEP_TARGETS

REPO_ROOT = Path(__file__).resolve().parents[3]


def _signature(base: Path) -> tf.compat.v1.SignatureDef:
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((base / str(VERSION) / "saved_model.pb").read_bytes())
    return saved.meta_graphs[0].signature_def["serving_default"]


def test_layout_and_signatures_match_the_documented_specs(seed_models: dict[str, Path]) -> None:
    assert list(seed_models) == list(MODEL_NAMES)
    for name, base in seed_models.items():
        assert base.name == name
        assert (base / "1" / "saved_model.pb").is_file()
        assert (base / LABELS_FILE).read_text().splitlines() == list(labels(name))
        signature = _signature(base)
        info = MODELS[name]
        for spec, side in ((info.inputs, signature.inputs), (info.outputs, signature.outputs)):
            assert sorted(side) == sorted(t.name for t in spec)
            for t in spec:
                dims = [d.size for d in side[t.name].tensor_shape.dim]
                assert dims == [-1 if d is None else d for d in t.shape]
                assert side[t.name].dtype == tf.as_dtype(t.dtype).as_datatype_enum


def test_wide_deep_reproduces_the_seed_table_above_one(seed_models: dict[str, Path]) -> None:
    x = demo_inputs("wide_deep")
    served = saved_model_predict(seed_models["wide_deep"] / "1", x)["output_1"][:, 0]
    in_keras = keras_predict("wide_deep", x)[:, 0]
    np.testing.assert_allclose(served, in_keras, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(served, WIDE_DEEP_TARGETS, atol=1e-5)
    assert np.all(served[:5] > 1.0)
    assert abs(float(served[0]) - 1.002850) < 1e-5
    assert np.all(served[5:8] < 0.0015)


def test_binary_mlp_and_softmax_201_tell_their_stories(seed_models: dict[str, Path]) -> None:
    scores = saved_model_predict(seed_models["binary_mlp"] / "1", demo_inputs("binary_mlp"))
    probability = scores["probability"][:, 0]
    np.testing.assert_allclose(probability, BINARY_MLP_TARGETS, rtol=1e-3, atol=1e-7)
    assert {0, 1} <= set((probability > 0.5).astype(int).tolist())

    x = demo_inputs("softmax_201")
    probs = saved_model_predict(seed_models["softmax_201"] / "1", x)["probabilities"]
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    # Row 0 is the seed's "about 0.00497 everywhere" vector.
    assert np.all(np.abs(probs[0] - 1 / 201) < 3e-4)
    assert np.argmax(probs[1:], axis=-1).tolist() == list(SOFTMAX_201_WINNERS)
    np.testing.assert_allclose(keras_predict("softmax_201", x), probs, rtol=1e-5, atol=1e-7)


def test_builds_are_deterministic(seed_models: dict[str, Path], tmp_path: Path) -> None:
    rebuilt = build_models(tmp_path / "again", force=True)
    for name in MODEL_NAMES:
        for inputs in (demo_inputs(name), random_inputs(name, 32, seed=7)):
            first = saved_model_predict(seed_models[name] / "1", inputs)
            second = saved_model_predict(rebuilt[name] / "1", inputs)
            assert first.keys() == second.keys()
            for alias in first:
                np.testing.assert_array_equal(first[alias], second[alias])


def test_second_build_is_a_cache_hit_without_tensorflow(seed_models: dict[str, Path]) -> None:
    out_dir = seed_models["wide_deep"].parent
    before = (seed_models["wide_deep"] / "1" / "saved_model.pb").stat().st_mtime_ns
    code = (
        "import sys; from pathlib import Path; from guard.dev.models import build_models; "
        f"build_models(Path({str(out_dir)!r})); print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "False"
    after = (seed_models["wide_deep"] / "1" / "saved_model.pb").stat().st_mtime_ns
    assert after == before


def test_models_cli_prints_the_base_paths(seed_models: dict[str, Path]) -> None:
    out_dir = seed_models["wide_deep"].parent
    result = subprocess.run(
        [sys.executable, "-m", "guard.dev.models", "build", str(out_dir)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert result.stdout.splitlines() == [f"{n}={p}" for n, p in seed_models.items()]


def test_packages_import_without_tensorflow() -> None:
    code = (
        "import sys, guard.dev.models, guard.dev.models.cli, guard.dev.backend, "
        "guard.dev.backend.cli; "
        "print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "False"


def test_example_config_matches_the_models(seed_models: dict[str, Path]) -> None:
    config = load_config(REPO_ROOT / "examples" / "guard.yaml")
    assert {m.name for m in config.models} == set(MODEL_NAMES)
    assert config.upstream == "127.0.0.1:8510"
    for model in config.models:
        signature = _signature(seed_models[model.name])
        for output in model.outputs:
            assert output.name in signature.outputs
            assert output.labels == labels(model.name)
    by_name = {m.name: m.outputs[0] for m in config.models}
    assert by_name["wide_deep"].on_violation == "clamp"
    assert by_name["wide_deep"].threshold == 0.5
    assert by_name["softmax_201"].check_sum and by_name["softmax_201"].argmax
    assert by_name["softmax_201"].top_k == 5
