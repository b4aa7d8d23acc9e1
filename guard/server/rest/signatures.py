"""What the REST front-end learns from the upstream's model metadata.

A REST predict response names no model version, and names no output when
there is only one. Both come from ``GET /v1/models/NAME[/versions/N]/metadata``
on the upstream: the version that answers, and each signature's outputs with
their dtype and shape. Answers are cached per (model, version or label),
bounded; an entry that follows the latest version is fetched again after
:data:`LATEST_TTL_S`, so a new version is seen within that time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from guard.dataplane.cache import BoundedCache

__all__ = [
    "LATEST_TTL_S",
    "METADATA_BYTES_MAX",
    "Metadata",
    "OutputInfo",
    "SignatureCache",
    "metadata_path",
]

#: How long the metadata of a model's latest version is trusted.
LATEST_TTL_S = 10.0
#: How long a failed lookup is remembered (the upstream is not asked on every call).
FAILURE_TTL_S = 1.0
_ENTRIES_MAX = 256
METADATA_BYTES_MAX = 4 * 1024 * 1024
"""The most metadata text read per model and version."""
_KEY_BYTES_MAX = 1024

Key = tuple[str, int | None, str | None]
Fetch = Callable[[str], Awaitable[tuple[int, bytes]]]
"""GET a path on the upstream: its HTTP status and body."""


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """One output of a signature."""

    dtype: str
    """TF's dtype name, ``DT_FLOAT`` etc."""
    dims: tuple[int, ...] | None
    """The shape, -1 where unknown; ``None`` for an unknown rank."""

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` has the declared shape."""
        dims = self.dims
        if dims is None:
            return True
        return len(dims) == len(shape) and all(
            d < 0 or d == n for d, n in zip(dims, shape, strict=True)
        )


@dataclass(frozen=True, slots=True)
class Metadata:
    """A model version's signatures, or why they are not known."""

    version: int | None = None
    signatures: dict[str, dict[str, OutputInfo]] = field(default_factory=dict)
    problem: str | None = None
    """Why the metadata could not be read (then ``signatures`` is empty)."""


@dataclass(slots=True)
class _Entry:
    metadata: Metadata
    expires: float


def metadata_path(model: str, version: int | None, label: str | None) -> str:
    """The upstream path of a model's metadata."""
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{version}"
    elif label is not None:
        path += f"/labels/{quote(label, safe='')}"
    return path + "/metadata"


class SignatureCache:
    """Model metadata by (model, version, label), fetched once per key at a time."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._entries: BoundedCache[Key, _Entry] = BoundedCache(
            _ENTRIES_MAX, max_key_bytes=_KEY_BYTES_MAX, weigh=_weigh
        )
        self._pending: dict[Key, asyncio.Future[Metadata]] = {}

    async def get(self, model: str, version: int | None, label: str | None) -> Metadata:
        """The metadata, from the cache or the upstream."""
        key = (model, version, label)
        entry = self._entries.get(key)
        if entry is not None and entry.expires > time.monotonic():
            metadata: Metadata = entry.metadata
            return metadata
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            metadata = await self._load(key)
            future.set_result(metadata)
        finally:
            del self._pending[key]
            if not future.done():
                future.cancel()
        return metadata

    async def _load(self, key: Key) -> Metadata:
        try:
            status, body = await self._fetch(metadata_path(*key))
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is reported the same way
            metadata = Metadata(problem=f"the metadata request failed: {exc or type(exc).__name__}")
        else:
            metadata = parse_metadata(status, body)
        fixed = key[1] is not None and metadata.problem is None
        ttl = FAILURE_TTL_S if metadata.problem else float("inf") if fixed else LATEST_TTL_S
        self._entries.put(key, _Entry(metadata, time.monotonic() + ttl))
        return metadata


def _weigh(key: Key) -> int:
    return len(key[0]) + len(key[2] or "")


def parse_metadata(status: int, body: bytes) -> Metadata:
    """TF Serving's GetModelMetadata JSON (``signature_def`` only) read into a :class:`Metadata`."""
    if status != 200:
        return Metadata(problem=f"the upstream answered its metadata with HTTP {status}")
    try:
        doc = json.loads(body)
        version_text = doc["model_spec"].get("version")
        version = int(version_text) if version_text not in (None, "") else None
        defs = doc["metadata"]["signature_def"]["signature_def"]
        signatures = {
            name: {alias: _output(info) for alias, info in sig.get("outputs", {}).items()}
            for name, sig in defs.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return Metadata(problem=f"its metadata could not be read ({type(exc).__name__}: {exc})")
    return Metadata(version, signatures)


def _output(info: dict[str, Any]) -> OutputInfo:
    shape = info.get("tensor_shape") or {}
    if shape.get("unknown_rank"):
        return OutputInfo(str(info.get("dtype", "")), None)
    dims = tuple(int(d["size"]) for d in shape.get("dim", []))
    return OutputInfo(str(info.get("dtype", "")), dims)
