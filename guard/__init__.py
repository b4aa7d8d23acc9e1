"""tf-serving-guard: an output guard for TensorFlow Serving.

The guard is a gRPC proxy that speaks TF Serving's API, applies per-output
rules (activation, range validation, clamping, thresholds, argmax/top-k,
labels) to Predict responses, and exports Prometheus metrics. The proxy never
imports TensorFlow.
"""

from guard._version import __version__
from guard.control.config import Config, ModelRule, OutputRule, load_config
from guard.dataplane.errors import ConfigError, GuardError

__all__ = [
    "Config",
    "ConfigError",
    "GuardError",
    "ModelRule",
    "OutputRule",
    "__version__",
    "load_config",
]
