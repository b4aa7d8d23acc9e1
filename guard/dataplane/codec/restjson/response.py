"""The response: :class:`RestPredictResponse`, a body read, and its rewrite:
the values a rule changed written over their text, derived outputs inserted
as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from guard.dataplane.codec.restjson.members import (
    _MEMBER,
    Texts,
    _member_text,
    _plain_texts,
    _row_members,
)
from guard.dataplane.codec.restjson.native import TextWriter
from guard.dataplane.codec.restjson.outputs import RestOutput, _Where
from guard.dataplane.codec.restjson.shared import (
    GUARD_OUTPUTS_KEY,
    INDENT,
    Array,
    Format,
    OutputKey,
    RestJsonError,
)
from guard.dataplane.codec.restjson.text import decimal_texts, json_string, value_texts
from guard.dataplane.dtypes import INT64 as _INT64

_REUSE_LIMIT = 1 << 22  # derived values x source values per instance, compared at once


@dataclass(slots=True)
class RestPredictResponse:
    """A REST predict response, read; :meth:`rewrite` makes the guarded body."""

    body: bytes
    format: Format
    outputs: dict[OutputKey, RestOutput]
    _where: dict[OutputKey, _Where]
    _root_after: int
    _root_keys: set[str]
    _names_per_instance: list[set[str]]
    writer: TextWriter | None = None
    """Writes derived outputs' text natively (None: Python does)."""

    @property
    def unnamed(self) -> bool:
        """The response has one output and does not name it."""
        return None in self.outputs

    @property
    def guard_outputs_taken(self) -> bool:
        """The upstream's answer has a top-level ``"guard_outputs"`` member of its
        own: the outputs derived from an unnamed output cannot be written, and
        :meth:`rewrite` refuses to. Where none is derived, it passes as it came."""
        return GUARD_OUTPUTS_KEY in self._root_keys

    def rewrite(
        self,
        changed: Mapping[OutputKey, Array] | None = None,
        derived: Mapping[OutputKey, Sequence[tuple[str, Array]]] | None = None,
        guard_outputs: str | None = None,
    ) -> bytes:
        """The body with ``changed`` values rewritten and ``derived`` outputs inserted.

        ``changed`` maps an output to its new values (same shape); only elements
        whose value differs are rewritten. ``derived`` maps a source output to its
        ``(name, array)`` pairs; in row format each array's first axis is the batch.
        ``guard_outputs`` is a ``"guard_outputs"`` member's text already made by
        :meth:`guard_outputs_text`, in place of ``derived[None]``.
        """
        edits: list[tuple[int, int, str]] = []
        for key, new in (changed or {}).items():
            edits.extend(self._value_edits(key, new))
        unnamed: list[tuple[str, Array]] = []
        for key, items in (derived or {}).items():
            self._output(key)
            if key is None:
                unnamed.extend(items)
            else:
                edits.extend(self._derived_edits(key, items))
        if unnamed:
            guard_outputs = self.guard_outputs_text(unnamed)
        if guard_outputs is not None:
            if self.guard_outputs_taken:
                raise RestJsonError(
                    f"the upstream's answer already has a top-level '{GUARD_OUTPUTS_KEY}' "
                    "member, where the guard writes the outputs it derives, and a second one "
                    "would leave the client to pick one of the two; TF Serving never writes "
                    "it: remove it upstream, or derive nothing from this output (no "
                    "threshold, argmax, top_k or labels)"
                )
            edits.append((self._root_after, self._root_after, guard_outputs))
        return apply_edits(self.body, edits)

    def _output(self, key: OutputKey) -> RestOutput:
        try:
            return self.outputs[key]
        except KeyError:
            raise RestJsonError(f"the response has no output {key!r}") from None

    def _value_edits(self, key: OutputKey, new: Array) -> list[tuple[int, int, str]]:
        out, where = self._output(key), self._where[key]
        if not out.numeric or where.starts is None or where.ends is None:
            raise RestJsonError(f"output {key!r} is not numeric; its values cannot be rewritten")
        new = np.asarray(new)
        if new.shape != out.values.shape:
            raise RestJsonError(f"output {key!r}: new shape {new.shape} != {out.values.shape}")
        return value_edits(out.values, new, where.starts, where.ends)

    def _derived_edits(
        self, key: str, items: Sequence[tuple[str, Array]]
    ) -> list[tuple[int, int, str]]:
        where = self._where[key]
        if self.format == "columnar":
            self._check_free([{k for k in self.outputs if k is not None}], items)
            texts = self._texts_from(key)
            text = "".join(
                ",\n" + INDENT * 2 + _member_text(n, a, 2, False, texts) for n, a in items
            )
            return [(where.after[0], where.after[0], text)]
        self._check_free(self._names_per_instance, items)
        texts = self._texts_from(key)
        members = _row_members(items, len(where.after), texts, _MEMBER, self.writer)
        return [
            (position, position, row) for position, row in zip(where.after, members, strict=True)
        ]

    def guard_outputs_text(self, items: Sequence[tuple[str, Array]]) -> str:
        """The root's ``"guard_outputs"`` member, with its leading comma: the
        outputs derived from the one unnamed output. Where no item is floating
        point (whose texts are the body's own), it depends on the format and
        the items alone, so the same items give the same text."""
        self._output(None)
        _check_unique(items)
        if self.format == "columnar":
            texts = self._texts_from(None)
            members = ["\n" + INDENT * 2 + _member_text(n, a, 2, False, texts) for n, a in items]
            value = "{" + ",".join(members) + "\n" + INDENT + "}"
        else:
            value = self._instance_objects(items)
        return ",\n" + INDENT + json_string(GUARD_OUTPUTS_KEY) + ": " + value

    def _instance_objects(self, items: Sequence[tuple[str, Array]]) -> str:
        values = self._output(None).values
        batch = values.shape[0] if values.ndim else 0
        close = "\n" + INDENT * 2 + "}"
        objects = [
            "{" + row[1:] + close
            for row in _row_members(items, batch, self._texts_from(None), _MEMBER, self.writer)
        ]
        if not objects:
            return "[]"
        inner = "\n" + INDENT * 2
        return "[" + inner + ("," + inner).join(objects) + "\n" + INDENT + "]"

    def _texts_from(self, source: OutputKey) -> Texts:
        """Element texts for outputs derived from ``source``: a float equal (bit for
        bit) to a value in the same instance of the source reuses that value's text,
        which is how TF Serving wrote that float; anything else is formatted."""

        def texts(name: str, array: Array, leaf_level: int) -> list[str]:
            reused = self._reused_texts(source, np.asarray(array))
            return reused if reused is not None else _plain_texts(name, array, leaf_level)

        return texts

    def _reused_texts(self, source: OutputKey, array: Array) -> list[str] | None:
        out, where = self.outputs[source], self._where[source]
        values = out.values
        if (
            where.starts is None
            or where.ends is None
            or array.dtype != values.dtype
            or array.dtype.kind != "f"
            or array.ndim == 0
            or values.ndim == 0
            or array.shape[0] != values.shape[0]
        ):
            return None
        batch = values.shape[0]
        derived, pool = array.reshape(batch, -1), values.reshape(batch, -1)
        if derived.size * pool.shape[1] > _REUSE_LIMIT:
            return None
        if self.writer is not None and derived.size and pool.size:
            return self._native_reused(where, derived, pool)
        bits = np.dtype(f"u{values.dtype.itemsize}")
        equal = derived.view(bits)[:, :, None] == pool.view(bits)[:, None, :]
        column = equal.argmax(axis=2)
        found = np.take_along_axis(equal, column[:, :, None], axis=2).ravel()
        token = (np.arange(batch)[:, None] * pool.shape[1] + column).ravel()
        texts = _token_texts(self.body, where.starts[token], where.ends[token])
        missing = np.flatnonzero(~found)
        for i, text in zip(missing.tolist(), decimal_texts(derived.ravel()[missing]), strict=True):
            texts[i] = text
        return texts

    def _native_reused(self, where: _Where, derived: Array, pool: Array) -> list[str]:
        """:meth:`_reused_texts`' answer, searched natively."""
        assert self.writer is not None and where.starts is not None and where.ends is not None
        found, missing = self.writer.reuse_texts(
            self.body,
            np.ascontiguousarray(where.starts, _INT64),
            np.ascontiguousarray(where.ends, _INT64),
            np.ascontiguousarray(pool),
            np.ascontiguousarray(derived),
            pool.shape[0],
            pool.itemsize,
        )
        if missing:
            absent = [i for i, text in enumerate(found) if text is None]
            for i, text in zip(absent, decimal_texts(derived.ravel()[absent]), strict=True):
                found[i] = text
        return cast(list[str], found)  # no None is left

    @staticmethod
    def _check_free(taken: list[set[str]], items: Sequence[tuple[str, Array]]) -> None:
        _check_unique(items)
        for name, _ in items:
            if any(name in names for names in taken):
                raise RestJsonError(f"derived output '{name}' would replace an output")


def _token_texts(body: bytes, starts: Array, ends: Array) -> list[str]:
    """The text of each number token ``body[start:end]``. Sliced one by one:
    gathering them through a numpy byte grid took twice as long (1024x6 tokens)."""
    return [
        body[s:e].decode("latin-1") for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def _check_unique(items: Sequence[tuple[str, Array]]) -> None:
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise RestJsonError(f"derived outputs named twice: {sorted(names)}")


def value_edits(old: Array, new: Array, starts: Array, ends: Array) -> list[tuple[int, int, str]]:
    """The edits that write each value of ``new`` that differs from ``old``
    (bit for bit) over its text, at the ``starts``/``ends`` the reader found
    (flat, row-major), as TF Serving writes ``old``'s dtype."""
    new = new.astype(old.dtype, copy=False)
    index = np.flatnonzero(_differs(old, new))
    texts = value_texts(new.ravel()[index])
    return list(zip(starts[index].tolist(), ends[index].tolist(), texts, strict=True))


def _differs(old: Array, new: Array) -> Array:
    if old.dtype.kind == "f":
        bits = np.dtype(f"u{old.dtype.itemsize}")
        differ: Array = old.view(bits) != new.view(bits)  # NaN == NaN, -0.0 != 0.0
        return differ
    out: Array = old != new
    return out


def apply_edits(body: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    """``body`` with each ``(start, end, text)`` edit's text in place of its span."""
    if not edits:
        return body
    edits.sort(key=lambda e: (e[0], e[1]))
    # Views, not slices: a slice of the body's bulk (3 MB at 1024x201) was a
    # copy, and its fresh pages cost more than the join that copies it again.
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    at = 0
    for start, end, text in edits:
        pieces.append(view[at:start])
        pieces.append(text.encode("latin-1"))
        at = end
    pieces.append(view[at:])
    return b"".join(pieces)
