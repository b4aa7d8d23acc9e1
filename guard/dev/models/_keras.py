"""Keras definitions of the seed models and their SavedModel export (imports TensorFlow)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras
from tf_keras import layers

from guard.dev.models import _spec

logger = logging.getLogger(__name__)


def keras_model(name: str) -> tf_keras.Model:
    """The tf_keras model of a seed model, with its deterministic weights set."""
    if name == _spec.WIDE_DEEP:
        return _wide_deep()
    if name == _spec.BINARY_MLP:
        return _binary_mlp()
    if name == _spec.SOFTMAX_201:
        return _softmax_201(name, _spec.softmax_201_weights())
    if name == _spec.SOFTMAX_201_UNTRAINED:
        return _softmax_201(name, _spec.softmax_201_untrained_weights())
    raise KeyError(f"unknown seed model {name!r}")


def _wide_deep() -> tf_keras.Model:
    cnn = tf_keras.Sequential(
        [
            tf_keras.Input(shape=(16, 4)),
            layers.Conv1D(20, 8, padding="same", activation="relu"),
            layers.GlobalAveragePooling1D(),
            layers.Dropout(0.6),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="cnn",
    )
    linear = tf_keras.experimental.LinearModel(name="linear")
    # No top-level activation: the linear output is added after the cnn's sigmoid,
    # which is exactly how the seed's model leaves [0, 1].
    model = tf_keras.experimental.WideDeepModel(linear, cnn, name="wide_deep")
    model([np.zeros((1, 4), np.float32), np.zeros((1, 16, 4), np.float32)])
    weights = _spec.wide_deep_weights()
    linear.set_weights(weights["linear"])
    cnn.set_weights(weights["cnn"])
    return model


def _binary_mlp() -> tf_keras.Model:
    model = tf_keras.Sequential(
        [
            tf_keras.Input(shape=(8,)),
            layers.Dense(124, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(124, activation="relu"),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="binary_mlp",
    )
    model.set_weights(_spec.binary_mlp_weights())
    return model


def _softmax_201(name: str, weights: list[np.ndarray]) -> tf_keras.Model:
    model = tf_keras.Sequential(
        [
            tf_keras.Input(shape=(16, 16, 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(40, activation="relu"),
            layers.Dense(201, activation="softmax"),
        ],
        name=name,
    )
    model.set_weights(weights)
    return model


def keras_predict(model: tf_keras.Model, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``model.predict`` with the inputs in the order the Keras model takes them."""
    info = _spec.MODELS[name]
    ordered = [inputs[t.name] for t in info.inputs]
    arg: Any = ordered if len(ordered) > 1 else ordered[0]
    return np.asarray(model.predict(arg, verbose=0))


class _Export(tf.Module):  # type: ignore[misc]
    """Holds only the variables and the serving function.

    Saving the Keras object itself would also trace every layer's Keras-specific
    functions, which costs seconds per model and adds nothing for serving.
    """

    def __init__(self, model: tf_keras.Model, name: str) -> None:
        super().__init__(name=name)
        info = _spec.MODELS[name]
        self.model_variables = list(model.weights)
        output_name = info.outputs[0].name
        specs = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name) for t in info.inputs]

        def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
            x: Any = list(args) if len(args) > 1 else args[0]
            return {output_name: model(x, training=False)}

        self.serve = tf.function(serve, input_signature=specs)


def export(name: str, version_dir: Path) -> None:
    """Write seed model ``name`` as a SavedModel with a ``serving_default`` signature."""
    model = keras_model(name)
    module = _Export(model, name)
    signature = module.serve.get_concrete_function()
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": signature})


@functools.lru_cache(maxsize=32)
def _load(version_dir: str, mtime_ns: int) -> Any:
    return tf.saved_model.load(version_dir)


def saved_model_predict(version_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a SavedModel's serving_default signature in this process (loads are cached)."""
    mtime_ns = (version_dir / "saved_model.pb").stat().st_mtime_ns
    fn = _load(str(version_dir.resolve()), mtime_ns).signatures["serving_default"]
    result = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in result.items()}


def verify(name: str, version_dir: Path) -> None:
    """Check that an exported seed model tells its story; raise RuntimeError if not."""
    outputs = saved_model_predict(version_dir, _spec.demo_inputs(name))
    (values,) = outputs.values()
    if name == _spec.WIDE_DEEP:
        flat = values[:, 0]
        above = int(np.sum(flat > 1.0))
        if above < 5 or not np.allclose(flat, _spec.WIDE_DEEP_TARGETS, atol=1e-4):
            raise RuntimeError(
                f"wide_deep: expected 5 demo outputs above 1.0 near the seed's table, got {flat}"
            )
        logger.info(
            "wide_deep: %d of %d demo outputs above 1.0 (max %.6f)",
            above,
            flat.size,
            float(flat.max()),
        )
    elif name == _spec.BINARY_MLP:
        if not np.allclose(values[:, 0], _spec.BINARY_MLP_TARGETS, rtol=1e-2, atol=1e-6):
            raise RuntimeError(f"binary_mlp: demo outputs drifted from the seed: {values[:, 0]}")
    elif name == _spec.SOFTMAX_201_UNTRAINED:
        # Seed 004: about 1/201 per class, rows summing to 1.
        if not (values.max() < 0.01 and np.allclose(values.sum(axis=-1), 1, atol=1e-5)):
            raise RuntimeError(f"softmax_201_untrained: not near-uniform, max {values.max()}")
    else:
        winners = np.argmax(values, axis=-1)[1:]
        sums = values.sum(axis=-1)
        if list(winners) != list(_spec.SOFTMAX_201_WINNERS) or not np.allclose(sums, 1, atol=1e-5):
            raise RuntimeError(f"softmax_201: unexpected demo winners {winners} or sums {sums}")
