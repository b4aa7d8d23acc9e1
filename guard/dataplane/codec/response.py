"""A PredictResponse read for guarding: its spec, output names and values.

Read from the native walker's layout (values in place in the bytes) when the
kernels found one, else parsed with the protobuf view, which also judges what
is malformed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, NamedTuple

from google.protobuf import message as pb_message

from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec.tensor import (
    FLOAT_DTYPES,
    Array,
    Encoding,
    decode_tensor,
    float_dtype,
    tensor_values,
)
from guard.dataplane.codec.views import ModelSpecView, PredictResponseView, TypedPredictResponse
from guard.dataplane.errors import DecodeError

if TYPE_CHECKING:
    from guard.dataplane._walk import OutputLayout
else:
    OutputLayout = tuple

__all__ = [
    "ModelSpecInfo",
    "OutputLayout",
    "Response",
    "Walked",
    "parse_predict_response",
    "read_predict_response",
    "spec_from_bytes",
]

#: What the walker reads: the spec's bytes, each output's layout in wire
#: order, and the same layouts by name.
Walked = tuple[bytes | None, tuple["OutputLayout", ...], dict[str, "OutputLayout"]]


class ModelSpecInfo(NamedTuple):
    """The parts of a ModelSpec the guard routes and labels by.

    A named tuple: one is made per request and per response, and a tuple is
    made in C, where a frozen dataclass sets each field in Python.
    """

    name: str
    signature_name: str
    version: int | None


def _spec_info(spec: Any) -> ModelSpecInfo:
    version = spec.version.value if spec.HasField("version") else None
    return ModelSpecInfo(spec.name, spec.signature_name, version)


# Clients and upstreams repeat the same few specs: each distinct one is parsed once.
_SPECS: BoundedCache[bytes, ModelSpecInfo] = BoundedCache(1024, max_key_bytes=512, weigh=len)


def spec_from_bytes(payload: bytes) -> ModelSpecInfo:
    """A serialized ModelSpec, parsed (raises protobuf's DecodeError)."""
    found = _SPECS.get(payload)
    if found is None:
        found = _spec_info(ModelSpecView.FromString(payload))
        _SPECS.put(payload, found)
    return found


def parse_predict_response(data: bytes) -> Any:
    """Parse PredictResponse bytes into a view. Raises :class:`DecodeError`."""
    try:
        view = PredictResponseView.FromString(data)
    except pb_message.DecodeError as exc:
        raise DecodeError(f"guard: cannot decode PredictResponse from upstream: {exc}") from None
    if not view.outputs:
        raise DecodeError(
            f"guard: cannot decode PredictResponse from upstream: {len(data)} bytes hold no outputs"
        )
    return view


class Response:
    """A PredictResponse read for guarding: its spec, its output names, each
    output's values on demand, and the protobuf view to rewrite it with."""

    __slots__ = ("data", "spec", "names", "layout", "_by_name", "_view", "_typed")

    def __init__(
        self,
        data: bytes,
        spec: ModelSpecInfo | None,
        names: Collection[str],
        view: Any = None,
        walked: Walked | None = None,
    ) -> None:
        self.data = data
        self.spec = spec
        """The response's ``model_spec``, if the upstream set one."""
        self.names = names
        """The output names, as a set-like collection."""
        self.layout: tuple[OutputLayout, ...] | None = None
        """Each output's layout in wire order (``None`` when protobuf parsed the response)."""
        self._by_name: dict[str, OutputLayout] | None = None
        if walked is not None:
            _, self.layout, self._by_name = walked
        self._view = view
        self._typed: Any = None

    def decode(self, name: str, limit_bytes: int) -> tuple[Array, Encoding] | None:
        """Output ``name`` as :func:`~guard.dataplane.codec.tensor.decode_tensor` decodes it."""
        if self._by_name is None:
            return decode_tensor(self._view.outputs[name], limit_bytes, self._typed_fallback(name))
        out = self._by_name[name]
        dt = float_dtype(out.dtype)
        if dt is None:
            return None
        values = memoryview(self.data)[out.offset : out.offset + out.length]
        if out.from_content:
            return tensor_values(dt, out.shape, values, b"", limit_bytes)
        return tensor_values(dt, out.shape, b"", values, limit_bytes)

    def span(self, name: str, values: Array) -> tuple[int, int] | None:
        """Where output ``name``'s values lie in :attr:`data`, fixed-width, when
        ``values`` (its new values) can be written over them byte for byte:
        packed float_val/double_val or tensor_content of the same dtype. ``None``
        where protobuf must write the tensor again (half_val's varints, a
        response protobuf parsed)."""
        if self._by_name is None:
            return None
        out = self._by_name[name]
        dt = FLOAT_DTYPES.get(out.dtype)
        if dt is None or values.dtype != dt.numpy or out.length != values.nbytes:
            return None
        if dt.varint and not out.from_content:
            return None  # half_val: each value a varint of its own length
        return out.offset, out.offset + out.length

    def view(self) -> Any:
        """The protobuf view (parsed on first use when the walker read the layout)."""
        if self._view is None:
            self._view = PredictResponseView.FromString(self.data)
        return self._view

    def _typed_fallback(self, name: str) -> Callable[[], Any]:
        def typed() -> Any:
            # Parsed once per response, however many outputs were sent unpacked.
            if self._typed is None:
                self._typed = TypedPredictResponse.FromString(self.data)
            return self._typed.outputs[name]

        return typed


def read_predict_response(data: bytes, walked: Walked | None) -> Response:
    """Read PredictResponse bytes for guarding. Raises :class:`DecodeError`.

    ``walked`` is the native walker's layout of ``data``, or ``None`` when the
    walker is not there or left these bytes to protobuf (an unknown field, a
    value sent unpacked, a non-ASCII name, ...).
    """
    if walked is None:
        view = parse_predict_response(data)
        spec = _spec_info(view.model_spec) if view.HasField("model_spec") else None
        return Response(data, spec, view.outputs.keys(), view=view)
    spec_bytes, _, by_name = walked
    spec = None if spec_bytes is None else spec_from_bytes(spec_bytes)
    return Response(data, spec, by_name.keys(), walked=walked)
