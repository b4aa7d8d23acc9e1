"""The guard's own protobuf "view" messages, declared with TensorFlow's field
numbers (wire-format facts from ``tensorflow/core/framework/tensor.proto`` and
``tensorflow_serving/apis``), so the proxy never imports TensorFlow.

The packed numeric fields (``float_val`` = 5, ``double_val`` = 6,
``int64_val`` = 10, ``half_val`` = 13) are declared as ``repeated bytes``: the
protobuf runtime hands each packed run over as one ``bytes`` object, which
``np.frombuffer`` reads without a per-value conversion, and writing
``array.tobytes()`` back produces exactly the packed encoding. A tensor whose
values were sent unpacked (legal protobuf) lands in the unknown fields; it is
read through the fully typed view (:data:`TypedPredictResponse`) instead.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "F_DOUBLE",
    "F_FLOAT",
    "F_HALF",
    "F_INT64",
    "ModelSpecView",
    "PredictResponseView",
    "TensorView",
    "TypedPredictResponse",
    "TypedTensor",
    "add_field",
    "add_map_field",
    "metadata_classes",
]

# TensorProto field numbers whose values the guard reads or writes.
F_FLOAT, F_DOUBLE, F_INT64, F_HALF = 5, 6, 10, 13

_F = descriptor_pb2.FieldDescriptorProto


def add_field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str = "",
) -> None:
    """Declare one field on a DescriptorProto."""
    f = msg.field.add(name=name, number=number, type=ftype)
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name


def add_map_field(
    msg: descriptor_pb2.DescriptorProto, full_name: str, name: str, number: int, value_type: str
) -> None:
    """Declare ``map<string, value_type> name = number`` on ``msg`` (whose fully
    qualified name is ``full_name``), with its nested entry type, as protoc does."""
    entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    add_field(entry, "key", 1, _F.TYPE_STRING)
    add_field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=value_type)
    add_field(
        msg, name, number, _F.TYPE_MESSAGE, repeated=True, type_name=f"{full_name}.{entry_name}"
    )


def _classes(fdp: descriptor_pb2.FileDescriptorProto, names: tuple[str, ...]) -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fdp.package}.{n}"))
        for n in names
    }


def _add_tensor(fdp: descriptor_pb2.FileDescriptorProto, pkg: str, typed: bool) -> None:
    shape = fdp.message_type.add(name="TensorShapeProto")
    dim = shape.nested_type.add(name="Dim")
    add_field(dim, "size", 1, _F.TYPE_INT64)
    add_field(dim, "name", 2, _F.TYPE_STRING)
    add_field(
        shape, "dim", 2, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.TensorShapeProto.Dim"
    )
    add_field(shape, "unknown_rank", 3, _F.TYPE_BOOL)

    tensor = fdp.message_type.add(name="TensorProto")
    add_field(tensor, "dtype", 1, _F.TYPE_INT32)  # an enum in TF; int32 keeps unknown values
    add_field(tensor, "tensor_shape", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.TensorShapeProto")
    add_field(tensor, "version_number", 3, _F.TYPE_INT32)
    add_field(tensor, "tensor_content", 4, _F.TYPE_BYTES)
    add_field(tensor, "string_val", 8, _F.TYPE_BYTES, repeated=True)
    # Typed: accepts packed and unpacked runs alike; used only as the fallback.
    kinds = (
        {F_FLOAT: _F.TYPE_FLOAT, F_DOUBLE: _F.TYPE_DOUBLE, F_INT64: _F.TYPE_INT64} if typed else {}
    )
    for name, number in (
        ("float_val", F_FLOAT),
        ("double_val", F_DOUBLE),
        ("int64_val", F_INT64),
        ("half_val", F_HALF),
    ):
        ftype = kinds.get(number, _F.TYPE_INT32) if typed else _F.TYPE_BYTES
        add_field(tensor, name, number, ftype, repeated=True)


def _build(typed: bool) -> dict[str, Any]:
    """Declare the view messages in a private pool (never TF's own names)."""
    pkg = "guard.view.typed" if typed else "guard.view"
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"{pkg.replace('.', '/')}.proto", package=pkg, syntax="proto3"
    )
    _add_tensor(fdp, pkg, typed)
    i64 = fdp.message_type.add(name="Int64Value")
    add_field(i64, "value", 1, _F.TYPE_INT64)

    spec = fdp.message_type.add(name="ModelSpec")
    add_field(spec, "name", 1, _F.TYPE_STRING)
    add_field(spec, "version", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.Int64Value")
    add_field(spec, "signature_name", 3, _F.TYPE_STRING)
    add_field(spec, "version_label", 4, _F.TYPE_STRING)

    resp = fdp.message_type.add(name="PredictResponse")
    add_map_field(resp, f".{pkg}.PredictResponse", "outputs", 1, f".{pkg}.TensorProto")
    add_field(resp, "model_spec", 2, _F.TYPE_MESSAGE, type_name=f".{pkg}.ModelSpec")
    return _classes(fdp, ("TensorProto", "ModelSpec", "PredictResponse"))


_VIEW = _build(typed=False)
_TYPED = _build(typed=True)
PredictResponseView: Any = _VIEW["PredictResponse"]
TensorView: Any = _VIEW["TensorProto"]
ModelSpecView: Any = _VIEW["ModelSpec"]
TypedTensor: Any = _TYPED["TensorProto"]
TypedPredictResponse: Any = _TYPED["PredictResponse"]


@functools.cache
def metadata_classes() -> dict[str, Any]:
    """Views of GetModelMetadata's request and response and of a SignatureDefMap
    (``guard check --upstream`` reads the upstream's signatures with them)."""
    pkg = "guard.view.metadata"
    fdp = descriptor_pb2.FileDescriptorProto(
        name="guard/view/metadata.proto", package=pkg, syntax="proto3"
    )
    spec = fdp.message_type.add(name="ModelSpec")
    add_field(spec, "name", 1, _F.TYPE_STRING)
    add_field(spec, "signature_name", 3, _F.TYPE_STRING)

    req = fdp.message_type.add(name="GetModelMetadataRequest")
    add_field(req, "model_spec", 1, _F.TYPE_MESSAGE, type_name=f".{pkg}.ModelSpec")
    add_field(req, "metadata_field", 2, _F.TYPE_STRING, repeated=True)

    anyv = fdp.message_type.add(name="Any")
    add_field(anyv, "type_url", 1, _F.TYPE_STRING)
    add_field(anyv, "value", 2, _F.TYPE_BYTES)

    resp = fdp.message_type.add(name="GetModelMetadataResponse")
    add_map_field(resp, f".{pkg}.GetModelMetadataResponse", "metadata", 2, f".{pkg}.Any")

    shape = fdp.message_type.add(name="TensorShapeProto")
    dim = shape.nested_type.add(name="Dim")
    add_field(dim, "size", 1, _F.TYPE_INT64)
    add_field(
        shape, "dim", 2, _F.TYPE_MESSAGE, repeated=True, type_name=f".{pkg}.TensorShapeProto.Dim"
    )
    add_field(shape, "unknown_rank", 3, _F.TYPE_BOOL)

    info = fdp.message_type.add(name="TensorInfo")
    add_field(info, "name", 1, _F.TYPE_STRING)
    add_field(info, "dtype", 2, _F.TYPE_INT32)
    add_field(info, "tensor_shape", 3, _F.TYPE_MESSAGE, type_name=f".{pkg}.TensorShapeProto")

    sig = fdp.message_type.add(name="SignatureDef")
    add_map_field(sig, f".{pkg}.SignatureDef", "inputs", 1, f".{pkg}.TensorInfo")
    add_map_field(sig, f".{pkg}.SignatureDef", "outputs", 2, f".{pkg}.TensorInfo")
    add_field(sig, "method_name", 3, _F.TYPE_STRING)

    sigmap = fdp.message_type.add(name="SignatureDefMap")
    add_map_field(sigmap, f".{pkg}.SignatureDefMap", "signature_def", 1, f".{pkg}.SignatureDef")
    return _classes(fdp, ("GetModelMetadataRequest", "GetModelMetadataResponse", "SignatureDefMap"))
