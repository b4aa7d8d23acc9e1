"""``guard check``: validate a config, and optionally hold it against the
signatures a live upstream reports through GetModelMetadata."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from guard.control.config import ANY, SERVING_DEFAULT, Config
from guard.dataplane.wire import FLOAT_DTYPES, add_field, add_map_field

__all__ = ["Finding", "check_against_upstream"]

_F = descriptor_pb2.FieldDescriptorProto
_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"
_SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


@functools.cache
def _metadata_classes() -> dict[str, Any]:
    pkg = "guard.view.metadata"
    fdp = descriptor_pb2.FileDescriptorProto(name="guard/view/metadata.proto", package=pkg)
    fdp.syntax = "proto3"

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

    info = fdp.message_type.add(name="TensorInfo")
    add_field(info, "name", 1, _F.TYPE_STRING)
    add_field(info, "dtype", 2, _F.TYPE_INT32)

    sig = fdp.message_type.add(name="SignatureDef")
    add_map_field(sig, f".{pkg}.SignatureDef", "inputs", 1, f".{pkg}.TensorInfo")
    add_map_field(sig, f".{pkg}.SignatureDef", "outputs", 2, f".{pkg}.TensorInfo")
    add_field(sig, "method_name", 3, _F.TYPE_STRING)

    sigmap = fdp.message_type.add(name="SignatureDefMap")
    add_map_field(sigmap, f".{pkg}.SignatureDefMap", "signature_def", 1, f".{pkg}.SignatureDef")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.{n}"))
        for n in ("GetModelMetadataRequest", "GetModelMetadataResponse", "SignatureDefMap")
    }


@dataclass(frozen=True)
class Finding:
    """One problem found by holding the config against the upstream."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _signatures(channel: grpc.Channel, model: str, timeout: float) -> Any:
    classes = _metadata_classes()
    req = classes["GetModelMetadataRequest"]()
    req.model_spec.name = model
    req.metadata_field.append("signature_def")
    call = channel.unary_unary(_METHOD)
    raw = call(req.SerializeToString(), timeout=timeout)
    resp = classes["GetModelMetadataResponse"].FromString(raw)
    if "signature_def" not in resp.metadata:
        return None
    return classes["SignatureDefMap"].FromString(resp.metadata["signature_def"].value)


def check_against_upstream(config: Config, upstream: str, timeout: float = 10.0) -> list[Finding]:
    """Call GetModelMetadata for each configured model (not ``*``) and report rule
    outputs the signatures lack or that are not floating point."""
    findings: list[Finding] = []
    options = [("grpc.max_receive_message_length", config.max_message_bytes)]
    with grpc.insecure_channel(upstream, options=options) as channel:
        for model in config.models:
            where = f"{config.source}: model '{model.name}' signature '{model.signature}'"
            if model.name == ANY:
                continue
            try:
                sigmap = _signatures(channel, model.name, timeout)
            except grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") else "ERROR"
                details = exc.details() if hasattr(exc, "details") else str(exc)
                findings.append(Finding(where, f"GetModelMetadata failed: {code}: {details}"))
                continue
            if sigmap is None:
                findings.append(Finding(where, "the upstream returned no signature_def metadata"))
                continue
            names = (
                list(sigmap.signature_def.keys())
                if model.signature == ANY
                else [model.signature or SERVING_DEFAULT]
            )
            for sig_name in names:
                if sig_name not in sigmap.signature_def:
                    known = ", ".join(sorted(sigmap.signature_def.keys()))
                    findings.append(
                        Finding(where, f"signature '{sig_name}' does not exist; it has: {known}")
                    )
                    continue
                outputs = sigmap.signature_def[sig_name].outputs
                for rule in model.outputs:
                    if rule.name == ANY:
                        if not any(info.dtype in FLOAT_DTYPES for info in outputs.values()):
                            findings.append(
                                Finding(
                                    f"{where} output '*'",
                                    f"signature '{sig_name}' has no floating-point output",
                                )
                            )
                        continue
                    if rule.name not in outputs:
                        known = ", ".join(sorted(outputs.keys()))
                        findings.append(
                            Finding(
                                f"{where} output '{rule.name}'",
                                f"signature '{sig_name}' has no such output; it has: {known}",
                            )
                        )
                    elif outputs[rule.name].dtype not in FLOAT_DTYPES:
                        findings.append(
                            Finding(
                                f"{where} output '{rule.name}'",
                                f"output is not floating point (dtype enum "
                                f"{outputs[rule.name].dtype}); the guard leaves it untouched",
                            )
                        )
    return findings
