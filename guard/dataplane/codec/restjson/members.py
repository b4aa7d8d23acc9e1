"""Derived outputs' text as object members: ``"name": value`` for each output,
and each instance's members joined in row format (natively where a
:class:`~guard.dataplane.codec.restjson.native.TextWriter` is given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from guard.dataplane.codec.restjson.native import TextWriter
from guard.dataplane.codec.restjson.shared import INDENT, Array, RestJsonError
from guard.dataplane.codec.restjson.text import json_string, nest_text, value_texts


def _per_instance(flat: list[str], shape: tuple[int, ...], batch: int) -> list[str]:
    """Each instance's value text, single-line, from all elements' texts (rank >= 2)."""
    step = math.prod(shape)
    return [nest_text(flat[i * step : (i + 1) * step], shape, 3, True) for i in range(batch)]


_MEMBER = ",\n" + INDENT * 3  # before each member of an instance object, in row format

Texts = Callable[[str, Array, int], list[str]]
"""``(name, array, leaf_level) -> each element's JSON text``."""


def _plain_texts(name: str, array: Array, leaf_level: int) -> list[str]:
    return value_texts(array, leaf_level=leaf_level, as_b64=_is_bytes_name(name, array))


def _member_text(
    name: str, array: Array, level: int, single_line: bool, texts: Texts = _plain_texts
) -> str:
    """``"name": value`` as a member of an object whose own members sit at ``level``."""
    items = texts(name, array, level + array.ndim)
    return json_string(name) + ": " + nest_text(items, array.shape, level, single_line)


def _row_members(
    items: Sequence[tuple[str, Array]],
    batch: int,
    texts: Texts,
    prefix: str,
    writer: TextWriter | None = None,
) -> list[str]:
    """Per instance, ``prefix + '"name": value'`` of each item, joined: members of
    an instance object in row format (3 open containers: root, list, object).

    A large batch is written by one ``%`` of a template per instance: with a
    batch of a thousand, joining each member's text piece by piece took longer
    than reading the response. A small one is joined directly: for one instance
    the template's object arrays cost more than the rest of the rewrite.
    The native ``writer`` joins them as the small batch's loop does.
    """
    columns = [_row_column(name, array, batch, texts, prefix) for name, array in items]
    if writer is not None:
        joined = [(head, flat, math.prod(shape), bool(shape)) for head, flat, shape in columns]
        rows = writer.row_members(joined, batch)
        if rows is not None:
            return rows
    if batch <= _SMALL_BATCH:
        rows = [""] * batch
        for head, flat, shape in columns:
            size = math.prod(shape)
            for i in range(batch):
                values = flat[i * size : (i + 1) * size]
                rows[i] += head + (values[0] if not shape else "[" + ", ".join(values) + "]")
        return rows
    formats: list[str] = []
    cells: list[Array] = []
    for head, flat, shape in columns:
        size = math.prod(shape)
        value = "%s" if not shape else "[" + ", ".join(["%s"] * size) + "]"
        formats.append(head.replace("%", "%%") + value)
        column = np.empty(len(flat), dtype=object)
        column[:] = flat
        cells.append(column.reshape(batch, size))
    if not cells:
        return [""] * batch
    template = "".join(formats)
    return [template % tuple(row) for row in np.concatenate(cells, axis=1).tolist()]


_SMALL_BATCH = 8


def _row_column(
    name: str, array: Array, batch: int, texts: Texts, prefix: str
) -> tuple[str, list[str], tuple[int, ...]]:
    """One item's member head, its elements' texts, and each instance's shape
    (``()`` once an instance of rank >= 2 is written whole)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] != batch:
        raise RestJsonError(
            f"derived output '{name}' has shape {array.shape}; row format needs "
            f"{batch} instances on its first axis"
        )
    shape = array.shape[1:]
    flat = texts(name, array, 3 + len(shape))
    if len(shape) > 1:
        flat, shape = _per_instance(flat, shape, batch), ()
    return prefix + json_string(name) + ": ", flat, shape


def _is_bytes_name(name: str, array: Array) -> bool:
    return array.dtype.kind in "OSU" and name.endswith("_bytes")
