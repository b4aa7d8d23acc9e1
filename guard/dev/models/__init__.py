"""The seed models: four small Keras models that reproduce the seed stories.

Importing this package does not import TensorFlow; only building the models and
the Keras helpers do (lazily).

- ``wide_deep``: inputs ``wide`` [batch, 4] and ``deep`` [batch, 16, 4] (float32),
  output ``output_1`` [batch, 1]; some demo rows give values above 1.0.
- ``binary_mlp``: input ``features`` [batch, 8], output ``probability`` [batch, 1].
- ``softmax_201``: input ``image`` [batch, 16, 16, 1], output ``probabilities``
  [batch, 201] with 201 class names.
- ``softmax_201_untrained``: softmax_201's architecture with its initial
  weights (seed 004): every row close to 1/201 per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guard.dev.models._build import LABELS_FILE, VERSION, build_models, model_paths
from guard.dev.models._spec import (
    BINARY_MLP,
    MODEL_NAMES,
    MODELS,
    SOFTMAX_201,
    SOFTMAX_201_UNTRAINED,
    WIDE_DEEP,
    ModelInfo,
    TensorInfo,
    demo_inputs,
    labels,
    random_inputs,
)

if TYPE_CHECKING:
    import tf_keras

__all__ = [
    "BINARY_MLP",
    "LABELS_FILE",
    "MODELS",
    "MODEL_NAMES",
    "SOFTMAX_201",
    "SOFTMAX_201_UNTRAINED",
    "VERSION",
    "WIDE_DEEP",
    "ModelInfo",
    "TensorInfo",
    "build_models",
    "demo_inputs",
    "keras_model",
    "keras_predict",
    "labels",
    "model_paths",
    "random_inputs",
    "saved_model_predict",
]


def keras_model(name: str) -> tf_keras.Model:
    """The tf_keras model behind a seed model, same weights as the export (imports TF)."""
    from guard.dev.models import _keras

    return _keras.keras_model(name)


def keras_predict(name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """In-process ``model.predict`` of a seed model on inputs keyed by alias (imports TF)."""
    from guard.dev.models import _keras

    return _keras.keras_predict(_keras.keras_model(name), name, inputs)


def saved_model_predict(version_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a SavedModel's serving_default signature in this process (imports TF)."""
    from guard.dev.models import _keras

    return _keras.saved_model_predict(Path(version_dir), inputs)
