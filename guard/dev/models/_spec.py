"""The seed models as plain data: names, tensor specs, weights, demo inputs, labels.

Everything here is numpy only, so the fixed inputs and the labels can be used by
processes that never import TensorFlow. The weights are generated with
``np.random.RandomState`` (whose streams numpy guarantees never to change) and the
last layer of each model is solved in float64 so that the demo inputs reproduce
the numbers quoted in the seed stories (../shared/seeds/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WIDE_DEEP = "wide_deep"
BINARY_MLP = "binary_mlp"
SOFTMAX_201 = "softmax_201"
SOFTMAX_201_UNTRAINED = "softmax_201_untrained"
MODEL_NAMES: tuple[str, ...] = (WIDE_DEEP, BINARY_MLP, SOFTMAX_201, SOFTMAX_201_UNTRAINED)

_SEEDS = {WIDE_DEEP: 1633, BINARY_MLP: 2023, SOFTMAX_201: 201, SOFTMAX_201_UNTRAINED: 4}

# wide_deep: the seed's table. Rows above 1.0 first, then the rows near 0, then a
# few ordinary probabilities.
WIDE_DEEP_TARGETS: tuple[float, ...] = (
    1.002850,
    1.001444,
    1.001368,
    1.000986,
    1.000707,
    0.000463,
    0.001023,
    0.001365,
    0.731000,
    0.412000,
    0.968000,
    0.057000,
)
# binary_mlp: the scores printed in the sigmoid-threshold seed, then two more.
BINARY_MLP_TARGETS: tuple[float, ...] = (
    7.4706882e-02,
    8.3481872e-01,
    2.9314638e-04,
    5.2297767e-03,
    2.1608515e-01,
    4.4894204e-03,
    5.1120580e-05,
    7.0263929e-04,
    0.9731,
    0.5862,
)
# softmax_201: row 0 is the seed's nearly uniform vector (about 0.00497 per class);
# rows 1..5 have a designed winner, with this much logit margin over the rest.
SOFTMAX_201_WINNERS: tuple[int, ...] = (17, 142, 3, 88, 200)
_SOFTMAX_201_MARGINS: tuple[float, ...] = (6.0, 3.5, 8.0, 2.5, 5.0)

WIDE_DEEP_LINEAR_KERNEL = np.array([[0.0016], [0.0012], [0.0009], [0.0006]])

_ADJECTIVES = (
    "amber azure coral crimson golden ivory jade lilac olive russet sable scarlet silver slate teal"
).split()
_ANIMALS = (
    "badger crane egret falcon heron ibis kestrel lynx marten osprey otter plover stoat wren"
).split()


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a serving signature."""

    name: str
    """The alias in the signature (the key of PredictRequest.inputs / PredictResponse.outputs)."""
    dtype: str
    """numpy dtype name, e.g. ``float32``."""
    shape: tuple[int | None, ...]
    """Shape with ``None`` for the batch dimension."""


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about one seed model."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...]
    """Class names: two for the binary models, one per class for softmax_201."""
    story: str
    """The seed story the model reproduces."""


def softmax_201_labels() -> tuple[str, ...]:
    """The 201 class names of softmax_201, index order (``amber_badger``, ...)."""
    names = [f"{adj}_{animal}" for adj in _ADJECTIVES for animal in _ANIMALS]
    return tuple(names[:201])


MODELS: dict[str, ModelInfo] = {
    WIDE_DEEP: ModelInfo(
        name=WIDE_DEEP,
        inputs=(
            TensorInfo("wide", "float32", (None, 4)),
            TensorInfo("deep", "float32", (None, 16, 4)),
        ),
        outputs=(TensorInfo("output_1", "float32", (None, 1)),),
        labels=("NO", "YES"),
        story="WideDeepModel adds the linear half after the deep half's sigmoid: "
        "some 'probabilities' exceed 1.0 (1.002850).",
    ),
    BINARY_MLP: ModelInfo(
        name=BINARY_MLP,
        inputs=(TensorInfo("features", "float32", (None, 8)),),
        outputs=(TensorInfo("probability", "float32", (None, 1)),),
        labels=("negative", "positive"),
        story="A sigmoid binary classifier returns scores; nobody applies the 0.5 threshold.",
    ),
    SOFTMAX_201: ModelInfo(
        name=SOFTMAX_201,
        inputs=(TensorInfo("image", "float32", (None, 16, 16, 1)),),
        outputs=(TensorInfo("probabilities", "float32", (None, 201)),),
        labels=softmax_201_labels(),
        story="A 201-way softmax returns ~0.00497 per class; clients re-implement argmax.",
    ),
    SOFTMAX_201_UNTRAINED: ModelInfo(
        name=SOFTMAX_201_UNTRAINED,
        inputs=(TensorInfo("image", "float32", (None, 16, 16, 1)),),
        outputs=(TensorInfo("probabilities", "float32", (None, 201)),),
        labels=softmax_201_labels(),
        story="softmax_201's architecture with its initial weights (seed 004): every row "
        "near 1/201 per class, every row summing to 1, nothing out of range.",
    ),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown seed model {name!r}; known: {', '.join(MODEL_NAMES)}")


def labels(name: str) -> tuple[str, ...]:
    """Class names of a seed model."""
    _check_name(name)
    return MODELS[name].labels


def random_inputs(name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A reproducible batch of plausible inputs of any size (for load tests and benchmarks)."""
    _check_name(name)
    rs = np.random.RandomState(seed)
    out: dict[str, np.ndarray] = {}
    for info in MODELS[name].inputs:
        shape = (batch, *(d for d in info.shape[1:] if d is not None))
        if name == BINARY_MLP:
            out[info.name] = rs.standard_normal(shape).astype(np.float32)
        else:
            out[info.name] = rs.uniform(0.0, 1.0, shape).astype(np.float32)
    return out


def demo_inputs(name: str) -> dict[str, np.ndarray]:
    """The fixed demo batch of a seed model, keyed by input alias.

    For wide_deep the first five rows give outputs above 1.0 (the seed's 1.002850,
    1.001444, ...), the next three give 0.000463..0.001365.
    """
    _check_name(name)
    if name == WIDE_DEEP:
        return _wide_deep_inputs()
    if name == BINARY_MLP:
        return _binary_mlp_inputs()
    return _softmax_201_inputs()  # the untrained model sees the trained one's inputs


# ----------------------------------------------------------------------------
# Inputs


def _wide_deep_inputs() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(_SEEDS[WIDE_DEEP] + 1)
    n = len(WIDE_DEEP_TARGETS)
    wide = np.empty((n, 4))
    # Large wide inputs push the linear half up where the seed saw values above 1.
    wide[:5] = rs.uniform(0.85, 1.0, (5, 4))
    wide[5:8] = rs.uniform(0.0, 0.08, (3, 4))
    wide[8:] = rs.uniform(0.2, 0.8, (n - 8, 4))
    deep = rs.uniform(0.0, 1.0, (n, 16, 4)) * rs.uniform(0.2, 1.0, (n, 1, 4))
    return {"wide": wide.astype(np.float32), "deep": deep.astype(np.float32)}


def _binary_mlp_inputs() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(_SEEDS[BINARY_MLP] + 1)
    return {"features": rs.standard_normal((len(BINARY_MLP_TARGETS), 8)).astype(np.float32)}


def _softmax_201_inputs() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(_SEEDS[SOFTMAX_201] + 1)
    n = 1 + len(SOFTMAX_201_WINNERS)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    images = np.empty((n, 16, 16, 1))
    for i in range(n):
        # Different textures per row keep the hidden features linearly independent.
        fx, fy, phase = rs.uniform(0.5, 4.0), rs.uniform(0.5, 4.0), rs.uniform(0, np.pi)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        images[i, :, :, 0] = 0.6 * pattern + 0.4 * rs.uniform(0.0, 1.0, (16, 16))
    return {"image": images.astype(np.float32)}


# ----------------------------------------------------------------------------
# Weights (Keras order per layer: kernel, bias)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def _solve_last_layer(features: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-norm kernel and bias with ``features @ kernel + bias == logits``."""
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    solution, _, rank, _ = np.linalg.lstsq(design, logits, rcond=None)
    if rank < design.shape[0]:
        raise RuntimeError("seed model features are degenerate; cannot place the targets")
    return solution[:-1], solution[-1]


def _relu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum(x, 0.0)
    return out


def _conv1d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv1D, stride 1, padding 'same' (TensorFlow pads (k-1)//2 before, the rest after)."""
    k = kernel.shape[0]
    before = (k - 1) // 2
    padded = np.pad(x, ((0, 0), (before, k - 1 - before), (0, 0)))
    steps = x.shape[1]
    out: np.ndarray = sum(padded[:, i : i + steps, :] @ kernel[i] for i in range(k)) + bias
    return out


def _conv2d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv2D, stride 1, odd square kernel, padding 'same'."""
    k = kernel.shape[0]
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    out: np.ndarray = (
        sum(padded[:, i : i + h, j : j + w, :] @ kernel[i, j] for i in range(k) for j in range(k))
        + bias
    )
    return out


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    out: np.ndarray = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return out


def wide_deep_weights() -> dict[str, list[np.ndarray]]:
    """Weights of wide_deep: ``linear`` (kernel, bias) and ``cnn`` (conv k/b, dense k/b)."""
    rs = np.random.RandomState(_SEEDS[WIDE_DEEP])
    conv_k = rs.normal(0.0, 0.3, (8, 4, 20))
    conv_b = rs.normal(0.0, 0.05, (20,))
    lin_k = WIDE_DEEP_LINEAR_KERNEL
    lin_b = np.zeros((1,))
    x = _wide_deep_inputs()
    wide = x["wide"].astype(np.float64)
    deep = x["deep"].astype(np.float64)
    features = _relu(_conv1d_same(deep, conv_k, conv_b)).mean(axis=1)
    linear_part = (wide @ lin_k + lin_b)[:, 0]
    sigmoid_targets = np.asarray(WIDE_DEEP_TARGETS) - linear_part
    if not np.all((sigmoid_targets > 0.0) & (sigmoid_targets < 1.0)):
        raise RuntimeError("wide_deep targets are out of the deep half's reach")
    dense_k, dense_b = _solve_last_layer(features, _logit(sigmoid_targets))
    f32 = np.float32
    return {
        "linear": [lin_k.astype(f32), lin_b.astype(f32)],
        "cnn": [
            conv_k.astype(f32),
            conv_b.astype(f32),
            dense_k.reshape(20, 1).astype(f32),
            np.reshape(dense_b, (1,)).astype(f32),
        ],
    }


def binary_mlp_weights() -> list[np.ndarray]:
    """Weights of binary_mlp: Dense(124) k/b, Dense(124) k/b, Dense(1) k/b."""
    rs = np.random.RandomState(_SEEDS[BINARY_MLP])
    w1 = rs.normal(0.0, np.sqrt(2.0 / 8), (8, 124))
    b1 = rs.normal(0.0, 0.05, (124,))
    w2 = rs.normal(0.0, np.sqrt(2.0 / 124), (124, 124))
    b2 = rs.normal(0.0, 0.05, (124,))
    x = _binary_mlp_inputs()["features"].astype(np.float64)
    hidden = _relu(_relu(x @ w1 + b1) @ w2 + b2)
    w3, b3 = _solve_last_layer(hidden, _logit(np.asarray(BINARY_MLP_TARGETS)))
    f32 = np.float32
    return [
        w1.astype(f32),
        b1.astype(f32),
        w2.astype(f32),
        b2.astype(f32),
        w3.reshape(124, 1).astype(f32),
        np.reshape(b3, (1,)).astype(f32),
    ]


def softmax_201_target_logits() -> np.ndarray:
    """The logits the demo rows of softmax_201 are built to produce, shape [6, 201]."""
    rs = np.random.RandomState(_SEEDS[SOFTMAX_201] + 2)
    base = np.linspace(-1.0, 1.0, 201)
    rows = [0.01 * rs.permutation(base)]
    for winner, margin in zip(SOFTMAX_201_WINNERS, _SOFTMAX_201_MARGINS, strict=True):
        row = rs.permutation(base)
        row[winner] = 1.0 + margin
        rows.append(row)
    return np.stack(rows)


def softmax_201_weights() -> list[np.ndarray]:
    """Weights of softmax_201: Conv2D(8) k/b, Conv2D(16) k/b, Dense(40) k/b, Dense(201) k/b."""
    rs = np.random.RandomState(_SEEDS[SOFTMAX_201])
    c1k = rs.normal(0.0, np.sqrt(2.0 / 9), (3, 3, 1, 8))
    c1b = rs.normal(0.0, 0.05, (8,))
    c2k = rs.normal(0.0, np.sqrt(2.0 / 72), (3, 3, 8, 16))
    c2b = rs.normal(0.0, 0.05, (16,))
    d1k = rs.normal(0.0, np.sqrt(2.0 / 16), (16, 40))
    d1b = rs.normal(0.0, 0.05, (40,))
    x = _softmax_201_inputs()["image"].astype(np.float64)
    h = _maxpool2(_relu(_conv2d_same(x, c1k, c1b)))
    h = _relu(_conv2d_same(h, c2k, c2b)).mean(axis=(1, 2))
    h = _relu(h @ d1k + d1b)
    d2k, d2b = _solve_last_layer(h, softmax_201_target_logits())
    f32 = np.float32
    return [a.astype(f32) for a in (c1k, c1b, c2k, c2b, d1k, d1b, d2k, d2b)]


def _glorot_uniform(rs: np.random.RandomState, shape: tuple[int, ...]) -> np.ndarray:
    """Keras' default kernel initializer: U(-l, l), l = sqrt(6 / (fan_in + fan_out))."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rs.uniform(-limit, limit, shape)


def softmax_201_untrained_weights() -> list[np.ndarray]:
    """softmax_201's layers as Keras initialises them (glorot-uniform kernels,
    zero biases), from a fixed seed: the model nobody trained."""
    rs = np.random.RandomState(_SEEDS[SOFTMAX_201_UNTRAINED])
    shapes = ((3, 3, 1, 8), (3, 3, 8, 16), (16, 40), (40, 201))
    weights: list[np.ndarray] = []
    for shape in shapes:
        weights += [_glorot_uniform(rs, shape), np.zeros(shape[-1])]
    return [w.astype(np.float32) for w in weights]
