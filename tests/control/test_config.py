"""Config loading: every error names the file, the rule and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.control.config import SERVING_DEFAULT, Config, load_config
from guard.dataplane.errors import ConfigError

GOOD = """
listen: "0.0.0.0:8500"
upstream: "127.0.0.1:8510"
metrics_listen: "0.0.0.0:9102"
default_timeout_s: 30
max_message_mb: 256
models:
  - name: wide_deep
    signature: "*"
    outputs:
      - name: "*"
        activation: none
        valid_range: [0.0, 1.0]
        check_sum: false
        sum_tolerance: 0.001
        on_violation: clamp
        threshold: 0.5
        labels: [NO, YES]
  - name: softmax_201
    signature: ""
    outputs:
      - name: probs
        check_sum: true
        argmax: true
        top_k: 5
        labels_file: labels.txt
"""


def write(tmp_path: Path, text: str, name: str = "guard.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message  # every error names the file
    return message


def test_the_documented_example_loads(tmp_path: Path) -> None:
    write(tmp_path, "\n".join(f"class_{i}" for i in range(201)) + "\n", "labels.txt")
    cfg = load_config(write(tmp_path, GOOD))
    wd, sm = cfg.models
    # YAML 1.1 would read NO/YES as booleans; labels must stay strings.
    assert wd.outputs[0].labels == ("NO", "YES")
    assert wd.outputs[0].on_violation == "clamp" and wd.outputs[0].threshold == 0.5
    assert sm.signature == SERVING_DEFAULT  # "" means serving_default
    assert sm.outputs[0].labels is not None and len(sm.outputs[0].labels) == 201
    assert cfg.max_message_bytes == 256 * 1024 * 1024


def test_defaults_match_the_documented_ones() -> None:
    cfg = Config()
    assert (cfg.listen, cfg.upstream, cfg.metrics_listen) == (
        "0.0.0.0:8500",
        "127.0.0.1:8510",
        "0.0.0.0:9102",
    )
    assert cfg.default_timeout_s == 30 and cfg.max_message_mb == 64


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "on_violation: fix",
            "field 'on_violation': 'fix' is not allowed; use one of observe, clamp, reject",
        ),
        (
            "activation: relu",
            "field 'activation': 'relu' is not allowed; use one of none, sigmoid, softmax",
        ),
        ("valid_range: [1, 0]", "field 'valid_range'"),
        ("valid_range: 5", "give [min, max] with min < max"),
        ("sum_tolerance: 0", "field 'sum_tolerance': 0 is not allowed"),
        ("top_k: -1", "field 'top_k': -1 is not allowed; give a whole number >= 0"),
        ("top_k: 2.5", "field 'top_k'"),
        ("argmax: yes", "field 'argmax': 'yes' is not allowed; use true or false"),
        ("threshold: high", "field 'threshold'"),
        ("ouputs_typo: 1", "unknown field 'ouputs_typo'"),
        ("lables: [a, b]", "unknown field 'lables' (did you mean 'labels'?)"),
        ("threshold: 0.5\n        argmax: true", "'threshold' and 'argmax' exclude each other"),
        ("threshold: 0.5\n        labels: [a, b, c]", "a threshold needs exactly 2 labels"),
        ("labels: [a, b]", "field 'labels' needs 'threshold', 'argmax' or 'top_k'"),
        ("argmax: true\n        labels_file: missing.txt", "field 'labels_file': cannot read"),
        # Red team: 1e-45 made softmax([2, 1, 0.1]) all NaN in float32, and
        # platt [1e39, 0] turned the logit 0 into NaN.
        (
            "activation: softmax\n        temperature: 1.0e-45",
            "field 'temperature': 1e-45 is not allowed; give a number from 0.001 to 1e6",
        ),
        (
            "activation: sigmoid\n        platt: [1.0e+39, 0]",
            "field 'platt': [1e+39, 0] is not allowed; give [a, b], two numbers from -1e6 to 1e6",
        ),
    ],
)
def test_output_errors_name_file_rule_and_field(
    tmp_path: Path, snippet: str, expected: str
) -> None:
    text = f"""
models:
  - name: wide_deep
    outputs:
      - name: output_1
        {snippet}
"""
    message = error_of(tmp_path, text)
    assert "models[0] (model 'wide_deep') outputs[0] (output 'output_1')" in message
    assert expected in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: 8500", "field 'listen': 8500 is not allowed; give HOST:PORT"),
        ("upstream: 'localhost:99999'", "field 'upstream'"),
        ("max_message_mb: 0", "field 'max_message_mb'"),
        ("default_timeout_s: -1", "field 'default_timeout_s'"),
        ("modles: []", "unknown field 'modles' (did you mean 'models'?)"),
        ("models: {}", "field 'models': give a list"),
        ("models:\n  - outputs: [{name: a}]", "field 'name' is required"),
        ("models:\n  - name: m\n    outputs: []", "field 'outputs': give a non-empty list"),
        (
            "models:\n  - name: m\n    outputs: [{name: a}, {name: a}]",
            "output 'a' has a rule already",
        ),
        (
            "models:\n  - {name: m, outputs: [{name: a}]}\n  - {name: m, outputs: [{name: b}]}",
            "model 'm' signature '*' has a rule already",
        ),
        ("- just\n- a list", "the top level must be a mapping"),
        ("models: [\n", "not valid YAML at line"),
    ],
)
def test_top_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    message = error_of(
        tmp_path,
        "listen: nope\nmodels:\n  - name: m\n    outputs:\n      - {name: a, top_k: -2, "
        "on_violation: maybe}\n",
    )
    assert "field 'listen'" in message
    assert "field 'top_k'" in message
    assert "field 'on_violation'" in message
    assert len(message.splitlines()) == 3


def test_a_number_where_text_belongs_is_one_problem_that_says_to_quote_it(
    tmp_path: Path,
) -> None:
    """Found (a red-team pass): name: 5 was two problems ('5 is not allowed'
    and 'name is required'), neither saying that YAML read it as a number."""
    message = error_of(tmp_path, "models:\n  - name: 5\n    outputs: [{name: 7}]\n")
    assert len(message.splitlines()) == 2, message
    assert (
        "field 'name': 5 is not allowed (YAML reads it as a number; quote it for text: '5')"
        in message
    ), message
    assert "'7')" in message and "is required" not in message, message


def test_a_character_yaml_refuses_is_placed_by_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, "models: []\nlisten: a\x00b\n")
    assert message.endswith(
        "not valid YAML at line 2, column 10: unacceptable character #x0000: "
        "control characters are not allowed"
    ), message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml")


def test_labels_file_rules(tmp_path: Path) -> None:
    write(tmp_path, "a\n\nb\n", "labels.txt")
    message = error_of(
        tmp_path,
        "models:\n  - name: m\n    outputs:\n      - {name: p, argmax: true, "
        "labels_file: labels.txt}\n",
    )
    assert "line 2 is empty" in message


def test_a_config_file_must_say_models_even_when_it_has_none(tmp_path: Path) -> None:
    message = error_of(tmp_path, "upstream: 127.0.0.1:8510\n")
    assert "field 'models' is missing" in message and "models: []" in message
    assert "the config file is empty" in error_of(tmp_path, "\n# nothing here\n")
    assert load_config(write(tmp_path, "models: []\n")).models == ()


def test_labels_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    from guard.control.rules_config import LABELS_MAX

    rule = (
        "models:\n  - name: m\n    outputs:\n      - {{name: p, argmax: true, labels_file: {}}}\n"
    )
    (tmp_path / "dir").mkdir()
    assert "is a directory, not a regular file" in error_of(tmp_path, rule.format("dir"))
    assert "not a regular file" in error_of(tmp_path, rule.format("/dev/zero"))
    (tmp_path / "many.txt").write_text("".join(f"c{i}\n" for i in range(LABELS_MAX + 1)))
    assert f"more than {LABELS_MAX}" in error_of(tmp_path, rule.format("many.txt"))
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of NULs, read no further than the limit
    assert "larger than" in error_of(tmp_path, rule.format("big.txt"))


LABELLED = (
    "models:\n  - name: m\n    outputs:\n      - {{name: p, argmax: true, labels: {labels}}}\n"
)


@pytest.mark.parametrize("label", ["a\\nb", "nul\\0", "sep\\u2028x", "\\ufeffbom", "del\\x7f"])
def test_inline_labels_refuse_what_labels_files_refuse(tmp_path: Path, label: str) -> None:
    """One rule for both: a label with a newline or a control character
    breaks the lines of whatever prints it (logs, text expositions)."""
    rule = LABELLED.format(labels=f'["{label}", "c"]')
    message = error_of(tmp_path, rule)
    assert "field 'labels'" in message and "labels may hold tabs" in message


def test_inline_labels_may_hold_tabs(tmp_path: Path) -> None:
    rule = LABELLED.format(labels='["a\\tb", "c"]')
    (model,) = load_config(write(tmp_path, rule)).models
    assert model.outputs[0].labels == ("a\tb", "c")
