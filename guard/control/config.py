"""Typed configuration: loaded from YAML and validated once, at load.

Every error names the file, the rule (model/signature/output) and the field,
and says what is allowed. Unknown keys are errors, with a suggestion when the
key looks like a typo of a known one.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from guard.dataplane.errors import ConfigError
from guard.dataplane.rulespec import (
    ACTIVATIONS,
    ANY,
    POLICIES,
    SERVING_DEFAULT,
    Activation,
    ModelRule,
    OutputRule,
    Policy,
)

__all__ = [
    "ANY",
    "SERVING_DEFAULT",
    "Config",
    "ModelRule",
    "OutputRule",
    "TLSConfig",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files for one side of the guard (all PEM paths)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    """On the listening side: require client certificates signed by this CA (mTLS).
    Towards the upstream: the CA that signed the upstream's certificate."""
    server_name: str | None = None
    """Upstream side only: override the name checked in the upstream's certificate."""


@dataclass(frozen=True)
class Config:
    """The whole guard configuration."""

    listen: str = "0.0.0.0:8500"
    """Where clients connect, with TF Serving's gRPC API."""
    upstream: str | None = "127.0.0.1:8510"
    """TF Serving's gRPC address. ``None`` only in dev mode (``guard serve --model``)."""
    metrics_listen: str = "0.0.0.0:9102"
    """Prometheus ``/metrics`` over HTTP. Use ``127.0.0.1:PORT`` to keep it on the pod."""
    default_timeout_s: float = 30.0
    """Deadline for upstream calls when the client sets none."""
    max_message_mb: int = 256
    """Largest request and response message, each way, in MiB."""
    max_concurrent_rpcs: int = 1024
    """In-flight RPC cap; calls beyond it get RESOURCE_EXHAUSTED at once."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, in-flight calls get this long to finish."""
    health_check_interval_s: float = 1.0
    """How often the upstream is probed for the health service and ``guard_upstream_up``."""
    max_class_label_values: int = 100
    """Distinct ``class`` label values per output before ``__other__``."""
    log_level: str = "info"
    tls: TLSConfig | None = None
    """TLS on the listening side."""
    upstream_tls: TLSConfig | None = None
    """TLS towards the upstream."""
    models: tuple[ModelRule, ...] = ()
    source: str = field(default="<defaults>", compare=False)
    """The file this came from."""

    @property
    def max_message_bytes(self) -> int:
        """``max_message_mb`` in bytes, capped to what gRPC accepts."""
        return min(self.max_message_mb * 1024 * 1024, 2**31 - 1)

    def model_names(self) -> frozenset[str]:
        """Configured exact model names (the only ones used as metric labels)."""
        return frozenset(m.name for m in self.models if m.name != ANY)


# --------------------------------------------------------------------------- YAML


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 reads ``NO``/``YES``/``on``/``off`` as booleans, which would turn
    ``labels: [NO, YES]`` into ``[False, True]``.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


# ------------------------------------------------------------------- validation

T = TypeVar("T")


class _Errors:
    """Collects every problem in a file, so one run shows them all."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        prefix = f"{self.source}: {where}: " if where else f"{self.source}: "
        self.items.append(prefix + msg)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("\n".join(self.items))


def _check_keys(
    errs: _Errors, where: str, data: Mapping[str, Any], allowed: tuple[str, ...]
) -> None:
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            errs.add(
                where, f"unknown field '{key}'{did_you_mean}; allowed fields: {', '.join(allowed)}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(
    errs: _Errors,
    where: str,
    data: Mapping[str, Any],
    key: str,
    default: T,
    convert: Callable[[Any], T],
    allowed: str,
) -> T:
    """Read ``data[key]`` through ``convert``; on failure record an error and return the default."""
    if key not in data or data[key] is None and default is None:
        return default
    value = data[key]
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        reason = f" ({exc})" if str(exc) else ""
        errs.add(where, f"field '{key}': {value!r} is not allowed{reason}; {allowed}")
        return default


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("")
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("")
    return value


def _as_float(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if not _is_number(value) or math.isnan(value):
            raise TypeError("")
        v = float(value)
        if v < lo or v > hi or (lo_open and v == lo):
            raise ValueError("")
        return v

    return convert


def _as_int(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("")
        if value < lo or value > hi:
            raise ValueError("")
        return value

    return convert


_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})$")


def _as_address(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("")
    m = _ADDRESS.match(value)
    if not m or int(m.group(1)) > 65535:
        raise ValueError("")
    return value


def _as_range(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError("")
    if not all(_is_number(v) and not math.isnan(v) for v in value):
        raise TypeError("")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError("the lower bound must be below the upper bound")
    return lo, hi


def _as_threshold(value: Any) -> float | tuple[float, ...]:
    if _is_number(value) and math.isfinite(value):
        return float(value)
    if isinstance(value, list) and value and all(_is_number(v) and math.isfinite(v) for v in value):
        return tuple(float(v) for v in value)
    raise TypeError("")


def _as_labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError("")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise TypeError(f"label {v!r} is not a string")
        out.append(str(v))
    return tuple(out)


def _as_tls(
    errs: _Errors, where: str, value: Any, base_dir: Path, upstream: bool
) -> TLSConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        errs.add(where, "must be a mapping with cert_file, key_file, ca_file")
        return None
    allowed = ("cert_file", "key_file", "ca_file") + (("server_name",) if upstream else ())
    _check_keys(errs, where, value, allowed)
    paths: dict[str, str | None] = {}
    for key in ("cert_file", "key_file", "ca_file"):
        raw = _get(errs, where, value, key, None, _as_str, "give a file path")
        if raw is None:
            paths[key] = None
            continue
        path = (base_dir / raw) if not Path(raw).is_absolute() else Path(raw)
        if not path.is_file():
            errs.add(where, f"field '{key}': file '{path}' does not exist")
        paths[key] = str(path)
    if (paths["cert_file"] is None) != (paths["key_file"] is None):
        errs.add(where, "cert_file and key_file must be given together")
    if not upstream and paths["cert_file"] is None:
        errs.add(where, "the listening side needs cert_file and key_file")
    server_name = _get(errs, where, value, "server_name", None, _as_str, "give a host name")
    return TLSConfig(paths["cert_file"], paths["key_file"], paths["ca_file"], server_name)


_TOP_KEYS = (
    "listen",
    "upstream",
    "metrics_listen",
    "default_timeout_s",
    "max_message_mb",
    "max_concurrent_rpcs",
    "shutdown_grace_s",
    "health_check_interval_s",
    "max_class_label_values",
    "log_level",
    "tls",
    "upstream_tls",
    "models",
)
_MODEL_KEYS = ("name", "signature", "outputs")
_OUTPUT_KEYS = (
    "name",
    "activation",
    "valid_range",
    "check_sum",
    "sum_tolerance",
    "on_violation",
    "threshold",
    "argmax",
    "top_k",
    "labels",
    "labels_file",
)


def _read_labels_file(
    errs: _Errors, where: str, raw: Any, base_dir: Path
) -> tuple[str, ...] | None:
    if not isinstance(raw, str):
        errs.add(where, f"field 'labels_file': {raw!r} is not allowed; give a file path")
        return None
    path = base_dir / raw
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        errs.add(where, f"field 'labels_file': cannot read '{path}': {exc.strerror}")
        return None
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            errs.add(where, f"field 'labels_file': '{path}' line {i} is empty; one label per line")
            return None
    if not lines:
        errs.add(where, f"field 'labels_file': '{path}' has no labels")
        return None
    return tuple(line.strip() for line in lines)


def _parse_output(
    errs: _Errors, where: str, data: Any, base_dir: Path, source: str
) -> OutputRule | None:
    if not isinstance(data, dict):
        errs.add(where, "must be a mapping (name, activation, valid_range, ...)")
        return None
    name = _get(errs, where, data, "name", ANY, _as_str, "give the output alias or '*'")
    where = f"{where} (output '{name}')"
    _check_keys(errs, where, data, _OUTPUT_KEYS)
    d = OutputRule()
    activation: str = _get(errs, where, data, "activation", "none", _as_str, "")
    if activation not in ACTIVATIONS:
        errs.add(
            where,
            f"field 'activation': {activation!r} is not allowed; "
            f"use one of {', '.join(ACTIVATIONS)}",
        )
        activation = "none"
    policy: str = _get(errs, where, data, "on_violation", "observe", _as_str, "")
    if policy not in POLICIES:
        errs.add(
            where,
            f"field 'on_violation': {policy!r} is not allowed; use one of {', '.join(POLICIES)}",
        )
        policy = "observe"
    valid_range = _get(
        errs, where, data, "valid_range", d.valid_range, _as_range, "give [min, max] with min < max"
    )
    check_sum = _get(errs, where, data, "check_sum", d.check_sum, _as_bool, "use true or false")
    sum_tolerance = _get(
        errs,
        where,
        data,
        "sum_tolerance",
        d.sum_tolerance,
        _as_float(0.0, 1.0, lo_open=True),
        "give a number in (0, 1]",
    )
    threshold = _get(
        errs, where, data, "threshold", None, _as_threshold, "give a number or a list of numbers"
    )
    argmax = _get(errs, where, data, "argmax", False, _as_bool, "use true or false")
    top_k = _get(errs, where, data, "top_k", 0, _as_int(0, 1_000_000), "give a whole number >= 0")
    labels = _get(errs, where, data, "labels", None, _as_labels, "give a list of strings")
    if "labels_file" in data:
        if "labels" in data:
            errs.add(where, "fields 'labels' and 'labels_file' exclude each other; give one")
        else:
            labels = _read_labels_file(errs, where, data["labels_file"], base_dir)

    if check_sum and policy == "clamp" and (valid_range[0] != 0.0 or valid_range[1] < 1.0):
        errs.add(
            where,
            "field 'valid_range': check_sum with on_violation: clamp renormalises rows into "
            f"[0, 1], which needs valid_range [0, max] with max >= 1, got {list(valid_range)}",
        )
    if threshold is not None and argmax:
        errs.add(
            where,
            "fields 'threshold' and 'argmax' exclude each other; a threshold is for "
            "binary/multi-label outputs, argmax for single-label multi-class outputs",
        )
    if labels is not None:
        if threshold is None and not argmax and top_k == 0:
            errs.add(where, "field 'labels' needs 'threshold', 'argmax' or 'top_k' to label")
        elif threshold is not None and len(labels) != 2:
            errs.add(
                where,
                f"field 'labels': a threshold needs exactly 2 labels (for 0 and 1), "
                f"got {len(labels)}",
            )
    return OutputRule(
        name=name,
        activation=cast(Activation, activation),
        valid_range=valid_range,
        check_sum=check_sum,
        sum_tolerance=sum_tolerance,
        on_violation=cast(Policy, policy),
        threshold=threshold,
        argmax=argmax,
        top_k=top_k,
        labels=labels,
        where=f"{source}: {where}",
    )


def _parse_model(
    errs: _Errors, where: str, data: Any, base_dir: Path, source: str
) -> ModelRule | None:
    if not isinstance(data, dict):
        errs.add(where, "must be a mapping with name, signature, outputs")
        return None
    name = _get(errs, where, data, "name", "", _as_str, "give the model name or '*'")
    if not name:
        errs.add(where, "field 'name' is required; give the model name (model_spec.name) or '*'")
    where = f"{where} (model '{name}')"
    _check_keys(errs, where, data, _MODEL_KEYS)
    signature = _get(errs, where, data, "signature", ANY, _as_str, "give a signature name or '*'")
    if signature == "":
        signature = SERVING_DEFAULT
    raw_outputs = data.get("outputs", [])
    if not isinstance(raw_outputs, list) or not raw_outputs:
        errs.add(where, "field 'outputs': give a non-empty list of output rules")
        raw_outputs = []
    outputs: list[OutputRule] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_outputs):
        rule = _parse_output(errs, f"{where} outputs[{i}]", raw, base_dir, source)
        if rule is None:
            continue
        if rule.name in seen:
            errs.add(
                f"{where} outputs[{i}]", f"output '{rule.name}' has a rule already in this model"
            )
        seen.add(rule.name)
        outputs.append(rule)
    return ModelRule(name=name, signature=signature, outputs=tuple(outputs))


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-loaded YAML document. Raises :class:`ConfigError`."""
    errs = _Errors(source)
    base_dir = base_dir or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping (listen, upstream, models, ...)"
        )
    _check_keys(errs, "", data, _TOP_KEYS)
    d = Config()
    addr = "give HOST:PORT, for example 127.0.0.1:8510"
    upstream: str | None = d.upstream
    if "upstream" in data and data["upstream"] is None:
        upstream = None
    else:
        upstream = _get(errs, "", data, "upstream", d.upstream, _as_address, addr)
    log_level = _get(errs, "", data, "log_level", d.log_level, _as_str, "")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        errs.add(
            "",
            f"field 'log_level': {log_level!r} is not allowed; use debug, info, warning or error",
        )
        log_level = d.log_level

    models: list[ModelRule] = []
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        errs.add("", "field 'models': give a list of model rules")
        raw_models = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(raw_models):
        model = _parse_model(errs, f"models[{i}]", raw, base_dir, source)
        if model is None:
            continue
        key = (model.name, model.signature)
        if key in seen:
            errs.add(
                f"models[{i}] (model '{model.name}')",
                f"model '{model.name}' signature '{model.signature}' has a rule already; "
                "merge the two entries",
            )
        seen.add(key)
        models.append(model)

    cfg = Config(
        listen=_get(errs, "", data, "listen", d.listen, _as_address, addr),
        upstream=upstream,
        metrics_listen=_get(errs, "", data, "metrics_listen", d.metrics_listen, _as_address, addr),
        default_timeout_s=_get(
            errs,
            "",
            data,
            "default_timeout_s",
            d.default_timeout_s,
            _as_float(0.0, 86400.0, lo_open=True),
            "give seconds, > 0",
        ),
        max_message_mb=_get(
            errs,
            "",
            data,
            "max_message_mb",
            d.max_message_mb,
            _as_int(1, 2047),
            "give whole MiB between 1 and 2047",
        ),
        max_concurrent_rpcs=_get(
            errs,
            "",
            data,
            "max_concurrent_rpcs",
            d.max_concurrent_rpcs,
            _as_int(1, 1_000_000),
            "give a whole number >= 1",
        ),
        shutdown_grace_s=_get(
            errs,
            "",
            data,
            "shutdown_grace_s",
            d.shutdown_grace_s,
            _as_float(0.0, 3600.0),
            "give seconds, >= 0",
        ),
        health_check_interval_s=_get(
            errs,
            "",
            data,
            "health_check_interval_s",
            d.health_check_interval_s,
            _as_float(0.05, 3600.0),
            "give seconds, >= 0.05",
        ),
        max_class_label_values=_get(
            errs,
            "",
            data,
            "max_class_label_values",
            d.max_class_label_values,
            _as_int(1, 10_000),
            "give a whole number between 1 and 10000",
        ),
        log_level=log_level.lower(),
        tls=_as_tls(errs, "tls", data.get("tls"), base_dir, upstream=False),
        upstream_tls=_as_tls(
            errs, "upstream_tls", data.get("upstream_tls"), base_dir, upstream=True
        ),
        models=tuple(models),
        source=source,
    )
    errs.raise_if_any()
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file: not UTF-8 (byte {exc.start})"
        ) from None
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    return parse_config(data, source=str(path), base_dir=path.parent)


def with_overrides(cfg: Config, **overrides: Any) -> Config:
    """Return ``cfg`` with the given top-level fields replaced (CLI flags, env vars),
    validating addresses the same way the file is validated."""
    errs = _Errors(f"{cfg.source} (overridden)")
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        clean[key] = _get(errs, "", {key: value}, key, None, _as_address, "give HOST:PORT")
    errs.raise_if_any()
    return replace(cfg, **clean)
