"""``guard check``: validate a config, and optionally hold it against the
signatures a live upstream reports through GetModelMetadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

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
    resp = classes["GetModelMetadataResponse"].FromString(raw)
    if "signature_def" not in resp.metadata:
        return None
    return classes["SignatureDefMap"].FromString(resp.metadata["signature_def"].value)


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
    if sigmap is None:
        return [Finding(where, "the upstream returned no signature_def metadata")]
    names = (
        list(sigmap.signature_def.keys())
        if model.signature == ANY
        else [model.signature or SERVING_DEFAULT]
    )
    findings = []
    for sig_name in names:
        if sig_name not in sigmap.signature_def:
            known = ", ".join(sorted(sigmap.signature_def.keys()))
            findings.append(
                Finding(where, f"signature '{sig_name}' does not exist; it has: {known}")
            )
            continue
        outputs = sigmap.signature_def[sig_name].outputs
        findings += [
            found
            for rule in model.outputs
            if (found := _check_output(where, sig_name, rule, outputs)) is not None
        ]
    return findings


def _check_output(where: str, sig_name: str, rule: OutputRule, outputs: Any) -> Finding | None:
    if rule.name == ANY:
        if any(info.dtype in FLOAT_DTYPES for info in outputs.values()):
            return None
        return Finding(
            f"{where} output '*'", f"signature '{sig_name}' has no floating-point output"
        )
    here = f"{where} output '{rule.name}'"
    if rule.name not in outputs:
        known = ", ".join(sorted(outputs.keys()))
        return Finding(here, f"signature '{sig_name}' has no such output; it has: {known}")
    if outputs[rule.name].dtype not in FLOAT_DTYPES:
        return Finding(
            here,
            f"output is not floating point (dtype enum {outputs[rule.name].dtype}); "
            "the guard leaves it untouched",
        )
    return None
