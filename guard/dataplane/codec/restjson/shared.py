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

STRING_TOKEN = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
"""A JSON string token, for ``re`` with ``re.S``. Possessive and unrolled:
``"(?:[^"\\]|\\.)*"`` kept backtracking state for every character, 120
bytes each (an 8 MB string in a request took the guard to 1 GB); this one
keeps none, and a string that does not close fails at once."""


class RestJsonError(ValueError):
    """The body is not a TF Serving predict response this module can read or extend."""
