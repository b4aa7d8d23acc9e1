"""What the REST front-end learns from the upstream's model metadata.

A REST predict response names no model version, and names no output when
there is only one. Both come from ``GET /v1/models/NAME[/versions/N]/metadata``
on the upstream: the version that answers, and each signature's outputs with
their dtype and shape. Answers are cached per (model, version or label); an
entry that follows the latest version is fetched again after
:data:`LATEST_TTL_S`, so a new version is seen within that time.

The key comes from the client's URL and the answer from the upstream, so
everything is bounded whatever either sends: the text read
(:data:`METADATA_BYTES_MAX`), what one model version may keep (its signatures'
outputs only, never their inputs: at most :data:`SIGNATURES_MAX` signatures,
:data:`OUTPUTS_MAX` outputs and :data:`ENTRY_BYTES_MAX` bytes, else none of it
is kept and the reason is), and the whole cache (:data:`ENTRIES_MAX` entries,
:data:`CACHE_BYTES_MAX` bytes as weighed, least recently used dropped first).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from guard.dataplane.errors import shown

if TYPE_CHECKING:
    from concurrent.futures import Executor

__all__ = [
    "CACHE_BYTES_MAX",
    "ENTRIES_MAX",
    "ENTRY_BYTES_MAX",
    "LATEST_TTL_S",
    "METADATA_BYTES_MAX",
    "OUTPUTS_MAX",
    "SIGNATURES_MAX",
    "Metadata",
    "OutputInfo",
    "SignatureCache",
    "metadata_path",
    "parse_metadata",
]

#: How long the metadata of a model's latest version is trusted; also how long
#: metadata that answered but could not be used is remembered.
LATEST_TTL_S = 10.0
#: How long a failed lookup (no answer, or not HTTP 200) is remembered, so the
#: upstream is not asked on every call.
FAILURE_TTL_S = 1.0
METADATA_BYTES_MAX = 1024 * 1024
"""The most metadata text read per model and version. TF Serving writes about
250 bytes per input or output, so this holds some 4,000 of them. ``json.loads``
takes up to ~35 ms per MiB of small objects and holds the GIL throughout, so
the event loop waits that long even though large metadata is read in a thread."""
SIGNATURES_MAX = 256
"""The most signatures kept per model version (real models have a few)."""
OUTPUTS_MAX = 2048
"""The most outputs kept per model version, all signatures together."""
ENTRY_BYTES_MAX = 1024 * 1024
"""The most memory one model version's signatures may take, as weighed
(about 250 bytes per output with short names)."""
ENTRIES_MAX = 256
CACHE_BYTES_MAX = 8 * 1024 * 1024
"""The most memory the cache may take, as weighed: hundreds of real models'
entries (a few KB each), or eight of the largest it keeps."""
_KEY_BYTES_MAX = 1024
_THREAD_BYTES_MIN = 64 * 1024  # less is read in about a millisecond
_RANK_MAX = 254  # TensorShape's kMaxDims
_DTYPE_CHARS_MAX = 64  # DT_COMPLEX128_REF is the longest
# An entry's key tuple, its _Entry, its Metadata and its slot in the OrderedDict.
_ENTRY_OVERHEAD = 400
_INT64_TEXT = re.compile(r"-?[0-9]{1,19}")
_JSON_KINDS = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}

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
    """Why the metadata could not be read or kept (then ``signatures`` is empty)."""


@dataclass(slots=True)
class _Entry:
    metadata: Metadata
    expires: float
    weight: int


class _Unreadable(ValueError):
    """Metadata that is JSON but not TF Serving's (the text says what)."""


def metadata_path(model: str, version: int | None, label: str | None) -> str:
    """The upstream path of a model's metadata."""
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{version}"
    elif label is not None:
        path += f"/labels/{quote(label, safe='')}"
    return path + "/metadata"


class _Entries:
    """Entries by key, at most :data:`ENTRIES_MAX` of them weighing at most
    :data:`CACHE_BYTES_MAX` together; the least recently used go first."""

    __slots__ = ("_data", "weight")

    def __init__(self) -> None:
        self._data: OrderedDict[Key, _Entry] = OrderedDict()
        self.weight = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Key) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def put(self, key: Key, entry: _Entry) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.weight -= old.weight
        if entry.weight > CACHE_BYTES_MAX:
            return
        while self._data and (
            len(self._data) >= ENTRIES_MAX or self.weight + entry.weight > CACHE_BYTES_MAX
        ):
            _, gone = self._data.popitem(last=False)
            self.weight -= gone.weight
        self._data[key] = entry
        self.weight += entry.weight


class SignatureCache:
    """Model metadata by (model, version, label), fetched once per key at a time."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._entries = _Entries()
        self._pending: dict[Key, asyncio.Future[Metadata]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        """The bytes the cached entries take, as weighed."""
        return self._entries.weight

    def fresh(self, model: str, version: int | None, label: str | None) -> Metadata | None:
        """The cached metadata while it may be used, else ``None`` (no await:
        the common case costs no coroutine)."""
        entry = self._entries.get((model, version, label))
        if entry is not None and entry.expires > time.monotonic():
            return entry.metadata
        return None

    async def get(self, model: str, version: int | None, label: str | None) -> Metadata:
        """The metadata, from the cache or the upstream."""
        cached = self.fresh(model, version, label)
        if cached is not None:
            return cached
        key = (model, version, label)
        while (pending := self._pending.get(key)) is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # The request that was fetching it went away: fetch it for this one.
        return await self._lead(key)

    async def _lead(self, key: Key) -> Metadata:
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
            metadata, weight, ttl = Metadata(problem=_failure(exc)), 0, FAILURE_TTL_S
        else:
            metadata, weight = await _parsed(status, body)
            fixed = key[1] is not None and metadata.problem is None
            ttl = FAILURE_TTL_S if status != 200 else float("inf") if fixed else LATEST_TTL_S
        model, _, label = key
        if len(model) + len(label or "") <= _KEY_BYTES_MAX:
            weight += _ENTRY_OVERHEAD + sys.getsizeof(model) + sys.getsizeof(label)
            weight += sys.getsizeof(metadata.problem)
            self._entries.put(key, _Entry(metadata, time.monotonic() + ttl, weight))
        return metadata


async def _parsed(status: int, body: bytes) -> tuple[Metadata, int]:
    """:func:`_parse`; large metadata in the parsing thread, where the event
    loop gets its turns while the signatures are read (not during ``json.loads``,
    which holds the GIL): 1 MiB of 2,048 outputs with 40 dims each stalls the
    loop 72 ms read on it, 18 ms read there."""
    if status != 200 or len(body) < _THREAD_BYTES_MIN:
        return _parse(status, body)
    return await asyncio.get_running_loop().run_in_executor(_parser(), _parse, status, body)


@functools.cache
def _parser() -> Executor:
    """One thread: one large metadata read at a time, each taking up to ~10
    times its text. Made when first needed: an idle guard does not hold it
    (nor the 0.3 MB its import takes)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-metadata")


def _failure(exc: Exception) -> str:
    text = shown(str(exc), 200)
    if isinstance(exc, TimeoutError):  # aiohttp's total timeout says nothing more
        return "the metadata request timed out" + (f": {text}" if text else "")
    return f"the metadata request failed: {text or type(exc).__name__}"


def parse_metadata(status: int, body: bytes) -> Metadata:
    """TF Serving's GetModelMetadata JSON (``signature_def`` only) read into a :class:`Metadata`."""
    return _parse(status, body)[0]


def _parse(status: int, body: bytes) -> tuple[Metadata, int]:
    """The metadata, and the bytes its signatures take (as weighed)."""
    if status != 200:
        return Metadata(problem=f"the upstream answered its metadata with HTTP {status}"), 0
    try:
        version, defs = _document(body)
        problem = _too_many(defs)
        signatures, weight = ({}, 0) if problem is not None else _signatures(defs)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return Metadata(problem=f"its metadata could not be read{_unreadable(exc)}"), 0
    if problem is None and weight > ENTRY_BYTES_MAX:
        problem = (
            f"its signatures' names and shapes take more than the {ENTRY_BYTES_MAX // 1024} "
            "KiB the guard keeps per model version"
        )
    if problem is not None:
        return Metadata(version, problem=problem), 0
    return Metadata(version, signatures), weight


def _document(body: bytes) -> tuple[int | None, dict[str, Any]]:
    """The version and the ``signature_def`` map of a metadata document."""
    doc = json.loads(body)
    version_text = doc["model_spec"].get("version")
    version = None if version_text in (None, "") else _int64(version_text, "its version")
    defs = doc["metadata"]["signature_def"]["signature_def"]
    if not isinstance(defs, dict):
        raise _Unreadable("its signature_def is not a JSON object")
    return version, defs


def _unreadable(exc: Exception) -> str:
    if isinstance(exc, _Unreadable):
        return f": {exc}"
    if isinstance(exc, KeyError):
        return f": it has no {shown(str(exc))} member"
    if isinstance(exc, RecursionError):
        return ": it nests too deeply"
    return f" ({type(exc).__name__}: {shown(str(exc), 200)})"


def _too_many(defs: dict[str, Any]) -> str | None:
    """Why the signatures are too many to keep, counted before any is read."""
    if len(defs) > SIGNATURES_MAX:
        return (
            f"its metadata declares {len(defs)} signatures, more than the {SIGNATURES_MAX} "
            "the guard keeps per model version"
        )
    outputs = 0
    for name, sig in defs.items():
        if not isinstance(sig, dict) or not isinstance(sig.get("outputs", {}), dict):
            raise _Unreadable(f"signature '{shown(name)}' or its outputs is not a JSON object")
        outputs += len(sig.get("outputs", {}))
    if outputs > OUTPUTS_MAX:
        return (
            f"its signatures declare {outputs} outputs, more than the {OUTPUTS_MAX} the guard "
            "keeps per model version"
        )
    return None


def _signatures(defs: dict[str, Any]) -> tuple[dict[str, dict[str, OutputInfo]], int]:
    """Each signature's outputs, and the bytes they take; stops counting past
    :data:`ENTRY_BYTES_MAX` (the caller then keeps none)."""
    signatures: dict[str, dict[str, OutputInfo]] = {}
    weight = 0
    for name, sig in defs.items():
        outputs: dict[str, OutputInfo] = {}
        for alias, info in sig.get("outputs", {}).items():
            output = _output(info, name, alias)
            outputs[alias] = output
            weight += sys.getsizeof(alias) + _weigh(output)
            if weight > ENTRY_BYTES_MAX:
                return {}, weight
        signatures[name] = outputs
        weight += sys.getsizeof(name) + sys.getsizeof(outputs)
    return signatures, weight + sys.getsizeof(signatures)


def _weigh(output: OutputInfo) -> int:
    dims = output.dims
    size = sys.getsizeof(output) + sys.getsizeof(output.dtype)
    if dims is None:
        return size
    return size + sys.getsizeof(dims) + sum(sys.getsizeof(d) for d in dims if not -5 <= d <= 256)


def _output(info: Any, signature: str, alias: str) -> OutputInfo:
    what = f"output '{shown(alias)}' of signature '{shown(signature)}'"
    if not isinstance(info, dict):
        raise _Unreadable(f"{what} is not a JSON object")
    dtype = info.get("dtype", "")
    if not isinstance(dtype, str) or len(dtype) > _DTYPE_CHARS_MAX:
        raise _Unreadable(f"{what} has a dtype that is not a dtype name")
    shape = info.get("tensor_shape") or {}
    if not isinstance(shape, dict):
        raise _Unreadable(f"{what} has a tensor_shape that is not a JSON object")
    if shape.get("unknown_rank") is True:
        return OutputInfo(dtype, None)
    dim = shape.get("dim", [])
    if not isinstance(dim, list) or len(dim) > _RANK_MAX:
        raise _Unreadable(f"{what} has no list of at most {_RANK_MAX} dims")
    return OutputInfo(dtype, tuple(_int64(d["size"], f"a dim size of {what}") for d in dim))


def _int64(value: object, what: str) -> int:
    """An int64 as proto3's JSON writes it: a number, or a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INT64_TEXT.fullmatch(value):
        number = int(value)
    else:
        raise _Unreadable(f"{what} is {_described(value)}, not an integer")
    if not -(2**63) <= number < 2**63:
        raise _Unreadable(f"{what} is {shown(str(number))}, outside int64")
    return number


def _described(value: object) -> str:
    if isinstance(value, float):
        return json.dumps(value)  # Infinity, NaN, 1.5 as they were written
    if isinstance(value, str):
        return json.dumps(shown(value))
    return _JSON_KINDS.get(type(value), type(value).__name__)
