"""The REST half of ``guard demo``: one predict per seed model, raw JSON beside guarded JSON.

TF Serving's REST API is called twice with the same body: on the backend directly (what
a REST client sees today) and through the guard (what it sees after changing only the
port). Both answers are trimmed (the first rows, the first values of each list) and set
side by side, with the guard's ``x-guard-action`` and ``x-guard-violations`` headers.
TensorFlow-free: the bodies are built from numpy arrays and read with :mod:`json`, which
accepts TF Serving's bare ``NaN`` and ``Infinity``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RestAnswer", "post_predict", "render", "request_body", "side_by_side", "trim"]

#: Rows and list items kept by :func:`trim`.
KEEP_ROWS = 2
KEEP_ITEMS = 2
#: Width :func:`render` aims at before it breaks an object or a list over lines.
COLUMN = 52


@dataclass(frozen=True)
class RestAnswer:
    """One HTTP answer: status, the guard's headers (empty when absent) and the JSON."""

    status: int
    action: str
    violations: str
    body: Any


class _More:
    """What :func:`trim` left out of a list, rendered as a bare ``…+N``."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __repr__(self) -> str:
        return f"…+{self.count}"


def request_body(inputs: dict[str, np.ndarray], columnar: bool = False) -> bytes:
    """A predict body: row format (``instances``) or columnar (``inputs``).

    With one input, row format holds the bare rows; with several, one object per row
    keyed by input alias, as TF Serving's REST API documents.
    """
    lists = {name: value.tolist() for name, value in inputs.items()}
    if columnar:
        return json.dumps({"inputs": lists}).encode()
    if len(lists) == 1:
        return json.dumps({"instances": next(iter(lists.values()))}).encode()
    rows = len(next(iter(lists.values())))
    return json.dumps(
        {"instances": [{k: v[i] for k, v in lists.items()} for i in range(rows)]}
    ).encode()


def post_predict(base_url: str, model: str, body: bytes, timeout_s: float = 60.0) -> RestAnswer:
    """``POST {base_url}/v1/models/{model}:predict``; an HTTP error status is an answer too."""
    url = f"{base_url}/v1/models/{model}:predict"
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback
            return _answer(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        return _answer(err.code, err.headers, err.read())


def _answer(status: int, headers: Any, raw: bytes) -> RestAnswer:
    return RestAnswer(
        status=status,
        action=headers.get("x-guard-action", ""),
        violations=headers.get("x-guard-violations", ""),
        body=json.loads(raw),
    )


def trim(value: Any, keep: int = KEEP_ROWS, depth: int = 0) -> Any:
    """``value`` with every list cut to its first items (rows at the top, values below)."""
    if isinstance(value, dict):
        return {k: trim(v, keep, depth) for k, v in value.items()}
    if isinstance(value, list):
        limit = keep if depth == 0 else KEEP_ITEMS
        head = [trim(v, keep, depth + 1) for v in value[:limit]]
        return head + ([_More(len(value) - limit)] if len(value) > limit else [])
    return value


def _compact(value: Any) -> str:
    if isinstance(value, _More):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return json.dumps(value)


def render(value: Any, width: int = COLUMN, indent: str = "") -> list[str]:
    """Lines of ``value`` as JSON: on one line where it fits ``width``, else one item a line.

    A list of scalars (trimmed, so short) always takes one line.
    """
    flat = _compact(value)
    if len(indent) + len(flat) <= width or not _nested(value):
        return [indent + flat]
    inner = indent + "  "
    items: list[list[str]]
    if isinstance(value, dict):
        items = [_keyed(k, v, width, inner) for k, v in value.items()]
        opening, closing = "{", "}"
    else:
        items = [render(v, width, inner) for v in value]
        opening, closing = "[", "]"
    lines = [indent + opening]
    for i, item in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines += [*item[:-1], item[-1] + comma]
    return [*lines, indent + closing]


def _nested(value: Any) -> bool:
    """Whether ``value`` is a non-empty object, or a list holding lists or objects."""
    if isinstance(value, dict):
        return bool(value)
    return isinstance(value, list) and any(isinstance(v, dict | list) for v in value)


def _keyed(key: str, value: Any, width: int, indent: str) -> list[str]:
    body = render(value, width, indent)
    return [f"{indent}{json.dumps(key)}: {body[0].lstrip()}", *body[1:]]


def side_by_side(left: list[str], right: list[str]) -> str:
    """Two columns of lines, the right one starting after the longest left line."""
    width = max(map(len, left), default=0)
    rows = max(len(left), len(right))
    pad_left = left + [""] * (rows - len(left))
    pad_right = right + [""] * (rows - len(right))
    return "\n".join(
        f"{a.ljust(width)} | {b}".rstrip() for a, b in zip(pad_left, pad_right, strict=True)
    )


def report(model: str, fmt: str, raw: RestAnswer, guarded: RestAnswer) -> str:
    """The REST block of one model: request format, guard headers and both bodies."""
    head = (
        f"{model} over REST ({fmt} format): HTTP {raw.status} -> {guarded.status}, "
        f"x-guard-action={guarded.action or '-'} "
        f"x-guard-violations={guarded.violations or '-'}"
    )
    left = ["raw (TF Serving)", *render(trim(raw.body))]
    right = ["guarded", *render(trim(guarded.body))]
    return head + "\n" + side_by_side(left, right)
