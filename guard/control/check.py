"""``guard check``: validate a config, and optionally hold it against the
signatures a live upstream reports through GetModelMetadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from guard.control.config import ANY, SERVING_DEFAULT, Config, ModelRule, OutputRule
from guard.dataplane.codec.tensor import FLOAT_DTYPES
from guard.dataplane.codec.views import metadata_classes
from guard.server.upstream import upstream_channel_args

__all__ = ["Finding", "check_against_upstream"]

_METHOD = "/tensorflow.serving.PredictionService/GetModelMetadata"
_SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


@dataclass(frozen=True)
class Finding:
    """One problem found by holding the config against the upstream."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _signatures(channel: grpc.Channel, model: str, timeout: float) -> Any:
    classes = metadata_classes()
    req = classes["GetModelMetadataRequest"]()
    req.model_spec.name = model
    req.metadata_field.append("signature_def")
    call = channel.unary_unary(_METHOD)
    raw = call(req.SerializeToString(), timeout=timeout)
    try:
        resp = classes["GetModelMetadataResponse"].FromString(raw)
        if "signature_def" not in resp.metadata:
            return None
        packed = resp.metadata["signature_def"]
        if packed.type_url != _SIGNATURE_DEF_MAP_URL:
            raise _Unreadable(f"its signature_def metadata is a {packed.type_url!r}")
        return classes["SignatureDefMap"].FromString(packed.value)
    except DecodeError as exc:
        raise _Unreadable(f"its GetModelMetadata answer does not parse: {exc}") from None


class _Unreadable(Exception):
    """The upstream's metadata answer is not what TF Serving sends."""


def check_against_upstream(config: Config, upstream: str, timeout: float = 10.0) -> list[Finding]:
    """Call GetModelMetadata for each configured model (not ``*``) and report rule
    outputs the signatures lack or that are not floating point. The channel is
    the one the proxy would open: ``upstream_tls`` applies."""
    findings: list[Finding] = []
    options, credentials = upstream_channel_args(config)
    if credentials is None:
        channel = grpc.insecure_channel(upstream, options=options)
    else:
        channel = grpc.secure_channel(upstream, credentials, options=options)
    with channel:
        for model in config.models:
            if model.name != ANY:
                findings += _check_model(channel, config.source, model, timeout)
    return findings


def _check_model(
    channel: grpc.Channel, source: str, model: ModelRule, timeout: float
) -> list[Finding]:
    where = f"{source}: model '{model.name}' signature '{model.signature}'"
    try:
        sigmap = _signatures(channel, model.name, timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return [Finding(where, f"GetModelMetadata failed: {code}: {details}")]
    except _Unreadable as exc:
        return [Finding(where, f"the upstream is not TF Serving as the guard reads it: {exc}")]
    if sigmap is None:
        return [Finding(where, "the upstream returned no signature_def metadata")]
    if model.signature == ANY:
        return _check_any_signature(where, model, sigmap.signature_def)
    sig_name = model.signature or SERVING_DEFAULT
    if sig_name not in sigmap.signature_def:
        known = _listed(sorted(sigmap.signature_def.keys()))
        return [Finding(where, f"signature {sig_name!r} does not exist; it has: {known}")]
    outputs = sigmap.signature_def[sig_name].outputs
    return [
        found for rule in model.outputs for found in _check_output(where, sig_name, rule, outputs)
    ]


def _check_any_signature(where: str, model: ModelRule, signatures: Any) -> list[Finding]:
    """A rule for any signature needs its output in one of them, not in each:
    a response that lacks it is left as it is. TF2 SavedModels also list
    ``__saved_model_init_op`` (TF Serving reports it; it serves nothing),
    which every rule failed against."""
    names = sorted(name for name in signatures if not name.startswith("__"))
    if not names:
        return [Finding(where, "the model has no signature a request can name")]
    findings = []
    for rule in model.outputs:
        if rule.name == ANY:
            if not any(_floats(signatures[name].outputs) for name in names):
                findings.append(
                    Finding(f"{where} output '*'", "no signature has a floating-point output")
                )
            continue
        having = [name for name in names if rule.name in signatures[name].outputs]
        if not having:
            known = _listed(names, lambda n: f"{n!r}: {_listed(sorted(signatures[n].outputs))}")
            findings.append(
                Finding(f"{where} output '{rule.name}'", f"no signature has it; they have {known}")
            )
        for name in having:
            findings += _check_output(where, name, rule, signatures[name].outputs)
    return findings


_LISTED_MAX = 8


def _listed(names: Sequence[str], show: Callable[[str], str] = repr) -> str:
    """The first few of the upstream's names, each shown as a repr (a name
    may hold a line break): 20,000 signatures made one line of 1.4 MB."""
    more = len(names) - _LISTED_MAX
    shown = ", ".join(show(name) for name in names[:_LISTED_MAX])
    return shown + (f" and {more} more" if more > 0 else "")


def _floats(outputs: Any) -> bool:
    return any(info.dtype in FLOAT_DTYPES for info in outputs.values())


def _check_output(where: str, sig_name: str, rule: OutputRule, outputs: Any) -> list[Finding]:
    if rule.name == ANY:
        if _floats(outputs):
            return []
        return [
            Finding(f"{where} output '*'", f"signature {sig_name!r} has no floating-point output")
        ]
    here = f"{where} output '{rule.name}'"
    if rule.name not in outputs:
        known = _listed(sorted(outputs.keys()))
        return [Finding(here, f"signature {sig_name!r} has no such output; it has: {known}")]
    info = outputs[rule.name]
    if info.dtype not in FLOAT_DTYPES:
        return [
            Finding(
                here,
                f"output is not floating point (dtype enum {info.dtype}); "
                "the guard leaves it untouched",
            )
        ]
    classes = _classes(info)
    if classes is None:
        return []
    return [
        Finding(here, f"in signature {sig_name!r}: {p}") for p in _shape_problems(rule, classes)
    ]


def _classes(info: Any) -> int | None:
    """Classes per row, as the rules count them (the last axis from rank 2
    on, else 1), where the signature says; ``None`` where it does not."""
    shape = info.tensor_shape
    if not info.HasField("tensor_shape") or shape.unknown_rank:
        return None
    if len(shape.dim) < 2:
        return 1
    size = int(shape.dim[-1].size)
    return size if size >= 0 else None


def _shape_problems(rule: OutputRule, classes: int) -> list[str]:
    """What every call would fail on, or get wrong, with ``classes`` per row."""
    problems = []
    if rule.activation == "softmax" and classes == 1:
        problems.append(
            "activation: softmax over one class makes every value 1.0; use activation: sigmoid"
        )
    if rule.top_k > classes:
        problems.append(f"top_k is {rule.top_k} but the output has {classes} classes")
    if rule.k and rule.labels is not None and len(rule.labels) != classes:
        problems.append(
            f"{len(rule.labels)} labels configured but the output has {classes} classes; "
            "give one label per class"
        )
    if isinstance(rule.threshold, tuple) and len(rule.threshold) != classes:
        problems.append(
            f"{len(rule.threshold)} thresholds configured but the output has {classes} classes"
        )
    return problems
