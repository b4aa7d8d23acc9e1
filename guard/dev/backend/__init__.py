"""The local TF-Serving-compatible backend.

It serves SavedModels over ``tensorflow.serving.PredictionService`` and
``ModelService`` for development, the demo and the tests; production keeps real
TF Serving. Importing this package does not import TensorFlow: the server runs
in its own process (``python -m guard.dev.backend`` / ``guard backend``), which
:func:`start_backend` launches.
"""

from guard.dev.backend.process import BackendProcess, BackendStartError, start_backend

__all__ = ["BackendProcess", "BackendStartError", "start_backend"]
