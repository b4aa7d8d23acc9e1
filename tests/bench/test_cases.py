"""bench.cases: the canned responses it asks for, and one case end to end
against real processes (the canned upstream, the passthrough, the guard)."""

from __future__ import annotations

import numpy as np

from bench import cases, payloads, report


def test_the_canned_output_overshoots_by_the_fraction_asked() -> None:
    model = payloads.CannedModel(batch=1024, classes=201, above=0.01)
    values = payloads.model_values(model)
    assert values.dtype == np.float32 and values.shape == (1024, 201)
    assert int((values > 1.0).sum()) == round(0.01 * values.size)
    assert float(values.max()) < 1.1
    uniform = payloads.model_values(payloads.CannedModel(batch=8, classes=1, values="uniform"))
    assert uniform.shape == (8, 1) and 0.0 <= float(uniform.min()) <= float(uniform.max()) < 1.0


def test_each_case_writes_a_config_the_guard_loads() -> None:
    import yaml

    from guard.control.config import parse_config

    for case in cases.CASES.values():
        config = parse_config(yaml.safe_load(case.guard_config()), "case.yaml")
        (model,) = config.models
        assert model.name == case.model.name
        assert model.outputs[0].name == case.model.output_name


def test_one_case_end_to_end() -> None:
    results = cases.run(["threshold"], ["passthrough", "guard"], rounds=1, requests=400)
    result = results["cases"]["threshold"]
    assert "probability_label" in result["guard_outputs"]
    (round_,) = result["rounds"]
    for name in ("passthrough", "guard"):
        assert round_[name]["errors"] == 0
        assert round_[name]["p99_ms"] >= round_[name]["p50_ms"] > 0
    assert result["summary"]["cpu_ratios"]["guard/passthrough"] is not None
    text = "\n".join(report.cases_section({**results, "command": "python -m bench.cases"}))
    assert "## Performance cases" in text and "`python -m bench.cases`" in text
    assert "| threshold | guard |" in text
