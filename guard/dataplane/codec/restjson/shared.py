"""The types, constants and the one error that every restjson module shares."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Array = np.ndarray[Any, Any]
Format = Literal["row", "columnar"]
OutputKey = str | None

GUARD_OUTPUTS_KEY = "guard_outputs"
"""Where derived outputs of an unnamed (single) output go, at the top level."""

INDENT = "    "
"""rapidjson PrettyWriter's default indent: four spaces per open container."""


class RestJsonError(ValueError):
    """The body is not a TF Serving predict response this module can read or extend."""
