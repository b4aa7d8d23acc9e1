"""What a rule says: the immutable rule types the config is parsed into.

The data plane applies these; :mod:`guard.control.config` reads them from
YAML and validates every field once, at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ACTIVATIONS",
    "Baseline",
    "ANY",
    "POLICIES",
    "SERVING_DEFAULT",
    "Activation",
    "ModelRule",
    "OutputRule",
    "Policy",
]

ANY = "*"
SERVING_DEFAULT = "serving_default"
ACTIVATIONS = ("none", "sigmoid", "softmax")
POLICIES = ("observe", "clamp", "reject")

Activation = Literal["none", "sigmoid", "softmax"]
Policy = Literal["observe", "clamp", "reject"]


@dataclass(frozen=True)
class Baseline:
    """A reference distribution of the confidence, for drift: ``fractions[i]``
    of the rows had a confidence in ``(edges[i-1], edges[i]]`` (the first bin
    is ``(-inf, edges[0]]``, the last ``(edges[-1], +inf)``)."""

    edges: tuple[float, ...]
    fractions: tuple[float, ...]
    """``len(edges) + 1`` non-negative numbers summing to 1."""


@dataclass(frozen=True)
class OutputRule:
    """What to do with one output tensor of one model/signature."""

    name: str = ANY
    """Output alias in the signature; ``*`` matches every floating-point output."""
    activation: Activation = "none"
    """Applied first, for logits: ``sigmoid``, or ``softmax`` over the last axis."""
    valid_range: tuple[float, float] = (0.0, 1.0)
    """Values outside ``[lo, hi]`` are violations (``below_min`` / ``above_max``)."""
    check_sum: bool = False
    """Rows of the last axis must sum to 1 within ``sum_tolerance``."""
    sum_tolerance: float = 1e-3
    on_violation: Policy = "observe"
    """``observe`` leaves the response as is, ``clamp`` repairs it, ``reject`` fails the call."""
    threshold: float | tuple[float, ...] | None = None
    """Adds ``<name>_class`` = 1 where value > threshold; a list gives one per class."""
    argmax: bool = False
    """Adds ``<name>_class`` and ``<name>_score`` (last axis reduced)."""
    top_k: int = 0
    """Adds ``<name>_top_k_class`` and ``<name>_top_k_score``, best first."""
    labels: tuple[str, ...] | None = None
    """Names for classes; adds ``<name>_label`` / ``<name>_top_k_label``."""
    temperature: float | None = None
    """Calibration: the activation sees ``z / temperature``."""
    platt: tuple[float, float] | None = None
    """Calibration (sigmoid only): the activation sees ``a * z + b``."""
    min_confidence: float | None = None
    """Rows whose predicted class has a lower probability abstain: class -1."""
    abstain_label: str = "unknown"
    """The ``<name>_label`` of an abstained row."""
    entropy: bool = True
    """Track each row's normalised entropy (multi-class outputs with a rule)."""
    near_uniform_entropy: float = 0.98
    """Rows at or above this normalised entropy count as near-uniform."""
    baseline: Baseline | None = None
    """The confidence's reference distribution; enables drift (PSI)."""
    drift_window: int = 10_000
    """Rows in the drift window (the most recent ones)."""
    where: str = field(default="", compare=False)
    """Human-readable origin (file and rule), for messages."""

    @property
    def derives(self) -> bool:
        """Whether this rule adds outputs to the response."""
        return self.threshold is not None or self.argmax or self.top_k > 0

    @property
    def tracks_entropy(self) -> bool:
        """Whether rows of a multi-class output get their entropy measured."""
        return self.entropy and (self.argmax or self.top_k > 0 or self.check_sum)

    @property
    def k(self) -> int:
        """How many best classes a row's ranking needs (argmax is the top 1)."""
        return self.top_k or (1 if self.argmax else 0)


@dataclass(frozen=True)
class ModelRule:
    """The rules for one model name (or ``*``) and signature (or ``*``)."""

    name: str
    signature: str = ANY
    """``*`` matches any signature; an empty string means ``serving_default``."""
    outputs: tuple[OutputRule, ...] = ()
