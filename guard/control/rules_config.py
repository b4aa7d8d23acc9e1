"""The ``models:`` section: model and output rules read from YAML and checked.

Every error names the file, the rule (model/signature/output) and the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from guard.control.files import FileTooLargeError, read_bounded
from guard.control.validate import (
    LABEL_FORBIDDEN,
    LABEL_FORBIDDEN_SAYS,
    Problems,
    as_baseline,
    as_bool,
    as_float,
    as_int,
    as_labels,
    as_pair,
    as_range,
    as_str,
    as_threshold,
    check_keys,
    get,
)
from guard.dataplane.rulespec import (
    ACTIVATIONS,
    ANY,
    POLICIES,
    SERVING_DEFAULT,
    Activation,
    Baseline,
    ModelRule,
    OutputRule,
    Policy,
)

__all__ = ["labels_file_paths", "parse_models"]

_MODEL_KEYS = ("name", "signature", "outputs")


def _as_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError("")
        return value

    return convert


_D = OutputRule()
#: Each output field: its default, how it is read, and what is allowed.
_OUTPUT_FIELDS: dict[str, tuple[Any, Callable[[Any], Any], str]] = {
    "activation": ("none", _as_choice(ACTIVATIONS), f"use one of {', '.join(ACTIVATIONS)}"),
    "valid_range": (_D.valid_range, as_range, "give [min, max] with min < max"),
    "check_sum": (_D.check_sum, as_bool, "use true or false"),
    "sum_tolerance": (
        _D.sum_tolerance,
        as_float(0.0, 1.0, lo_open=True),
        "give a number in (0, 1]",
    ),
    "on_violation": ("observe", _as_choice(POLICIES), f"use one of {', '.join(POLICIES)}"),
    "threshold": (None, as_threshold, "give a number or a list of numbers"),
    "argmax": (False, as_bool, "use true or false"),
    "top_k": (0, as_int(0, 1_000_000), "give a whole number >= 0"),
    "labels": (None, as_labels, "give a list of strings"),
    # Bounded so that ordinary logits stay finite in float32 once scaled (a
    # temperature of 1e-45 made softmax([2, 1, 0.1]) all NaN).
    "temperature": (None, as_float(1e-3, 1e6), "give a number from 0.001 to 1e6"),
    "platt": (
        None,
        as_pair(1e6),
        "give [a, b], two numbers from -1e6 to 1e6: sigmoid(a * z + b)",
    ),
    "min_confidence": (None, as_float(0.0, 1.0, lo_open=True), "give a number in (0, 1]"),
    "abstain_label": (_D.abstain_label, as_str, "give a string"),
    "entropy": (_D.entropy, as_bool, "use true or false"),
    "near_uniform_entropy": (
        _D.near_uniform_entropy,
        as_float(0.0, 1.0, lo_open=True),
        "give a number in (0, 1]",
    ),
    "baseline": (
        None,
        as_baseline,
        "give {edges: [e1, e2, ...], fractions: [f0, f1, ..., fn]} with increasing edges and "
        "one more fraction than edges, summing to 1 (guard baseline writes one)",
    ),
    "drift_window": (_D.drift_window, as_int(1, 1_000_000), "give a whole number in [1, 1000000]"),
}
_OUTPUT_KEYS = ("name", *_OUTPUT_FIELDS, "labels_file")


#: A labels file must be a regular file of at most this many bytes and labels.
LABELS_FILE_MAX_BYTES = 4 * 1024 * 1024
LABELS_MAX = 100_000
#: All the labels files of one config together hold at most this many labels.
#: Each distinct file counts once, however many rules name it: they share it.
LABELS_FILES_TOTAL_MAX = 1_000_000
#: One config names at most this many labels files (paths as written): the
#: guard polls each for changes every second, on its event loop.
LABELS_FILES_MAX = 100


def _labels_path(base_dir: Path, raw: str) -> Path:
    """A ``labels_file`` as written, relative to the config's directory; not
    resolved, so that a watcher follows its symlinks as they change."""
    return base_dir / raw


def labels_file_paths(raw_models: Any, base_dir: Path) -> tuple[Path, ...]:
    """The labels files a ``models:`` list names, each once, in order, at most
    :data:`LABELS_FILES_MAX`. The list need not be valid (what is not a list
    of mappings is skipped): a reload that failed still watches the files its
    config named, so that fixing one of them is seen."""
    found: dict[Path, None] = {}
    for model in raw_models if isinstance(raw_models, list) else ():
        outputs = model.get("outputs") if isinstance(model, dict) else None
        for output in outputs if isinstance(outputs, list) else ():
            raw = output.get("labels_file") if isinstance(output, dict) else None
            if isinstance(raw, str) and len(found) < LABELS_FILES_MAX:
                found.setdefault(_labels_path(base_dir, raw), None)
    return tuple(found)


class _LabelsFiles:
    """The labels files of one config: each distinct file (by its real path)
    is read and checked once, and the rules naming it share its labels; all
    of them together hold at most :data:`LABELS_FILES_TOTAL_MAX` labels."""

    def __init__(self, base_dir: Path) -> None:
        self._base_dir = base_dir
        self._read: dict[str, tuple[str, ...] | str] = {}  # real path: labels, or the problem
        self._named: set[Path] = set()
        self._total = 0

    def labels(self, problems: Problems, where: str, raw: Any) -> tuple[str, ...] | None:
        """The labels of the file ``raw`` names; its problem recorded at ``where``."""
        if not isinstance(raw, str):
            problems.add(where, f"field 'labels_file': {raw!r} is not allowed; give a file path")
            return None
        path = _labels_path(self._base_dir, raw)
        if path not in self._named and len(self._named) >= LABELS_FILES_MAX:
            problems.add(
                where, f"field 'labels_file': '{path}' would be labels file number "
                f"{LABELS_FILES_MAX + 1} of this config, more than {LABELS_FILES_MAX}; rules with "
                "the same labels can name the same file",
            )  # fmt: skip
            return None
        self._named.add(path)
        key = os.path.realpath(path)
        found = self._read.get(key)
        if found is None:
            found = self._read[key] = self._load(path)
        if isinstance(found, str):
            problems.add(where, found)
            return None
        return found

    def _load(self, path: Path) -> tuple[str, ...] | str:
        labels = _read_labels_file(path)
        if isinstance(labels, str):
            return labels
        total = self._total + len(labels)
        if total > LABELS_FILES_TOTAL_MAX:
            return (
                f"field 'labels_file': '{path}' has {len(labels)} labels, which would bring "
                f"the labels read from files in this config to {total}, more than "
                f"{LABELS_FILES_TOTAL_MAX}; rules that name the same file share it and count "
                "it once"
            )
        self._total = total
        return labels


def _read_labels_file(path: Path) -> tuple[str, ...] | str:
    """The labels in ``path``, or what is wrong with it."""
    try:
        text = read_bounded(path, LABELS_FILE_MAX_BYTES).decode("utf-8")
    except FileTooLargeError as exc:
        return (
            f"field 'labels_file': {exc}; give a regular file of at most "
            f"{LABELS_FILE_MAX_BYTES // (1024 * 1024)} MiB, one label per line"
        )
    except OSError as exc:
        return f"field 'labels_file': cannot read '{path}': {exc.strerror}"
    except UnicodeDecodeError as exc:
        return f"field 'labels_file': '{path}' is not UTF-8 (byte {exc.start})"
    return _labels_from_text(path, text)


def _labels_from_text(path: Path, text: str) -> tuple[str, ...] | str:
    """One label per line, lines ended by LF or CRLF only: not by the other
    characters :meth:`str.splitlines` splits on (NEL, form feed, U+2028...),
    which would shift every label after them."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if text.endswith("\r"):
        text = text[:-1]
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > LABELS_MAX:
        return f"field 'labels_file': '{path}' has {len(lines)} labels, more than {LABELS_MAX}"
    for i, line in enumerate(lines, 1):
        if (bad := LABEL_FORBIDDEN.search(line)) is not None:
            return (
                f"field 'labels_file': '{path}' line {i} holds U+{ord(bad.group()):04X}; "
                f"{LABEL_FORBIDDEN_SAYS}"
            )
        if not line.strip():
            return f"field 'labels_file': '{path}' line {i} is empty; one label per line"
    if not lines:
        return f"field 'labels_file': '{path}' has no labels"
    return tuple(line.strip() for line in lines)


def _check_combinations(problems: Problems, where: str, v: dict[str, Any]) -> None:
    """The rules between fields."""
    lo, hi = v["valid_range"]
    if v["check_sum"] and v["on_violation"] == "clamp" and (lo != 0.0 or hi < 1.0):
        problems.add(
            where,
            "field 'valid_range': check_sum with on_violation: clamp renormalises rows into "
            f"[0, 1], which needs valid_range [0, max] with max >= 1, got {[lo, hi]}",
        )
    if v["threshold"] is not None and v["argmax"]:
        problems.add(
            where,
            "fields 'threshold' and 'argmax' exclude each other; a threshold is for "
            "binary/multi-label outputs, argmax for single-label multi-class outputs",
        )
    _check_calibration(problems, where, v)
    _check_abstention(problems, where, v)
    if "drift_window" in v and v["baseline"] is None and v["drift_window"] != _D.drift_window:
        problems.add(where, "field 'drift_window' needs 'baseline' (the distribution to compare)")
    labels = v["labels"]
    if labels is None:
        return
    if v["threshold"] is None and not v["argmax"] and v["top_k"] == 0:
        problems.add(where, "field 'labels' needs 'threshold', 'argmax' or 'top_k' to label")
    elif v["threshold"] is not None and len(labels) != 2:
        problems.add(
            where,
            f"field 'labels': a threshold needs exactly 2 labels (for 0 and 1), got {len(labels)}",
        )


def _check_calibration(problems: Problems, where: str, v: dict[str, Any]) -> None:
    if v["temperature"] is not None and v["platt"] is not None:
        problems.add(where, "fields 'temperature' and 'platt' exclude each other; give one")
    if v["temperature"] is not None and v["activation"] == "none":
        problems.add(
            where,
            "field 'temperature' needs 'activation: softmax' or 'activation: sigmoid' "
            "(it scales the logits the activation reads)",
        )
    if v["platt"] is not None and v["activation"] != "sigmoid":
        problems.add(where, "field 'platt' needs 'activation: sigmoid' (sigmoid(a * z + b))")


def _check_abstention(problems: Problems, where: str, v: dict[str, Any]) -> None:
    if v["min_confidence"] is None:
        return
    threshold = v["threshold"]
    if isinstance(threshold, tuple) and len(threshold) > 1:
        problems.add(
            where,
            "field 'min_confidence' does not combine with per-class thresholds "
            "(a list of thresholds); give one threshold, or use argmax/top_k",
        )
    elif threshold is None and not v["argmax"] and v["top_k"] == 0:
        problems.add(
            where, "field 'min_confidence' needs 'argmax', 'top_k' or 'threshold' to abstain from"
        )


def _parse_output(
    problems: Problems, where: str, data: Any, files: _LabelsFiles, source: str
) -> OutputRule | None:
    if not isinstance(data, dict):
        problems.add(where, "must be a mapping (name, activation, valid_range, ...)")
        return None
    name = get(problems, where, data, "name", ANY, as_str, "give the output alias or '*'")
    where = f"{where} (output '{name}')"
    check_keys(problems, where, data, _OUTPUT_KEYS)
    v = {
        key: get(problems, where, data, key, default, convert, allowed)
        for key, (default, convert, allowed) in _OUTPUT_FIELDS.items()
    }
    if "labels_file" in data:
        if "labels" in data:
            problems.add(where, "fields 'labels' and 'labels_file' exclude each other; give one")
        else:
            v["labels"] = files.labels(problems, where, data["labels_file"])
    _check_combinations(problems, where, v)
    if v["baseline"] is not None:
        v["baseline"] = Baseline(*v["baseline"])
    v["activation"] = cast(Activation, v["activation"])
    v["on_violation"] = cast(Policy, v["on_violation"])
    return OutputRule(name=name, where=f"{source}: {where}", **v)


def _parse_outputs(
    problems: Problems, where: str, raw_outputs: Any, files: _LabelsFiles, source: str
) -> tuple[OutputRule, ...]:
    if not isinstance(raw_outputs, list) or not raw_outputs:
        problems.add(where, "field 'outputs': give a non-empty list of output rules")
        return ()
    outputs: list[OutputRule] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_outputs):
        rule = _parse_output(problems, f"{where} outputs[{i}]", raw, files, source)
        if rule is None:
            continue
        if rule.name in seen:
            problems.add(
                f"{where} outputs[{i}]", f"output '{rule.name}' has a rule already in this model"
            )
        seen.add(rule.name)
        outputs.append(rule)
    return tuple(outputs)


def _parse_model(
    problems: Problems, where: str, data: Any, files: _LabelsFiles, source: str
) -> ModelRule | None:
    if not isinstance(data, dict):
        problems.add(where, "must be a mapping with name, signature, outputs")
        return None
    name = get(problems, where, data, "name", "", as_str, "give the model name or '*'")
    if not name and data.get("name") in (None, ""):  # else refused above already
        problems.add(
            where, "field 'name' is required; give the model name (model_spec.name) or '*'"
        )
    where = f"{where} (model '{name}')"
    check_keys(problems, where, data, _MODEL_KEYS)
    signature = get(problems, where, data, "signature", ANY, as_str, "give a signature name or '*'")
    outputs = _parse_outputs(problems, where, data.get("outputs", []), files, source)
    return ModelRule(name=name, signature=signature or SERVING_DEFAULT, outputs=outputs)


def parse_models(
    problems: Problems, raw_models: Any, base_dir: Path, source: str
) -> tuple[ModelRule, ...]:
    """The ``models:`` list; problems are recorded, not raised."""
    if not isinstance(raw_models, list):
        problems.add("", "field 'models': give a list of model rules")
        return ()
    models: list[ModelRule] = []
    seen: set[tuple[str, str]] = set()
    files = _LabelsFiles(base_dir)  # this load's: a reload reads the files again
    for i, raw in enumerate(raw_models):
        model = _parse_model(problems, f"models[{i}]", raw, files, source)
        if model is None:
            continue
        key = (model.name, model.signature)
        if key in seen:
            problems.add(
                f"models[{i}] (model '{model.name}')",
                f"model '{model.name}' signature '{model.signature}' has a rule already; "
                "merge the two entries",
            )
        seen.add(key)
        models.append(model)
    return tuple(models)
