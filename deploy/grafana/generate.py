"""Generate the guard's Grafana dashboard from code.

The committed ``guard-dashboard.json`` next to this file is this script's output; a test
regenerates it and compares. After editing a panel, run::

    .venv/bin/python deploy/grafana/generate.py          # rewrite guard-dashboard.json
    .venv/bin/python deploy/grafana/generate.py --check  # exit 1 if the file is stale

Every query uses only the metric names of the guard (see README, "Metrics"), the
dashboard variables ``$datasource``, ``$model``, ``$signature``, ``$output``, ``$protocol`` and
Grafana's
``$__rate_interval`` / ``$__range``, so the integration test can substitute them and run
each query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).with_name("guard-dashboard.json")
UID = "tf-serving-guard"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label selectors per metric family: each metric only carries some of the variables.
SEL_OUTPUT = 'model=~"$model", signature=~"$signature", output=~"$output"'
SEL_SIGNATURE = 'model=~"$model", signature=~"$signature"'
SEL_MODEL = 'model=~"$model"'
# The request metrics carry the protocol (grpc, rest); the output metrics do not: a
# violation is the same series whichever protocol carried the response.
SEL_PROTOCOL = 'protocol=~"$protocol"'
SEL_TRAFFIC = f"{SEL_MODEL}, {SEL_PROTOCOL}"
RATE = "[$__rate_interval]"


def _query(expr: str, legend: str, ref: str = "A", *, instant: bool = False) -> Any:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    q = q.datasource(DATASOURCE)
    return q.instant() if instant else q.range()


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def _timeseries(title: str, description: str, unit: str, *queries: Any) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(12)
        .height(8)
        .fill_opacity(10)
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def _variables() -> list[Any]:
    def label_var(name: str, label: str, query: str, description: str) -> db.QueryVariable:
        return (
            db.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DATASOURCE)
            .query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        db.DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus that scrapes the guard sidecars.")
        .type("prometheus"),
        label_var(
            "model",
            "Model",
            "label_values(guard_output_values_total, model)",
            "model_spec.name as configured in the guard; __other__ is any unconfigured name.",
        ),
        label_var(
            "signature",
            "Signature",
            'label_values(guard_output_values_total{model=~"$model"}, signature)',
            "Signature name of the checked Predict responses.",
        ),
        label_var(
            "output",
            "Output",
            'label_values(guard_output_values_total{model=~"$model", '
            'signature=~"$signature"}, output)',
            "Output alias (tensor name in the response).",
        ),
        label_var(
            "protocol",
            "Protocol",
            "label_values(guard_requests_total, protocol)",
            "grpc (port 8500) or rest (port 8501). Filters the traffic panels only: the "
            "output-quality panels count both protocols together.",
        ),
    ]


def _quality_panels() -> list[Any]:
    violations = f"guard_output_violations_total{{{SEL_OUTPUT}}}"
    values = f"guard_output_values_total{{{SEL_OUTPUT}}}"
    return [
        _timeseries(
            "Violation rate by model / output / kind",
            "Checked output values per second that broke the rule: below_min / above_max "
            "(outside valid_range), nan, inf. Anything above zero means the model hands out "
            "values that are not valid probabilities (for example a WideDeep model adding "
            "its linear half after the sigmoid). Find the model and output here, check the "
            "'Responses by action' panel to see whether the guard clamped or rejected them, "
            "then fix the model's head or set on_violation: clamp for that output.",
            "ops",
            _query(
                f"sum by (model, output, kind) (rate({violations}{RATE}))",
                "{{model}} / {{output}} / {{kind}}",
            ),
        ),
        _timeseries(
            "Share of checked values that violate",
            "Violating values divided by all checked values, per model and output. A share "
            "that is small but steady is a systematic model bug (values just above 1); a "
            "sudden jump after a rollout means the new model version is broken: roll it "
            "back. The GuardOutputOutOfRange alert fires on this ratio.",
            "percentunit",
            _query(
                f"sum by (model, output) (rate({violations}{RATE}))"
                f" / sum by (model, output) (rate({values}{RATE}))",
                "{{model}} / {{output}}",
            ),
        ),
        stat.Panel()
        .title("NaN / Inf values in range")
        .description(
            "NaN and ±Inf output values counted in the selected time range. Any value above "
            "zero is a numerically broken model (overflow, division by zero, corrupt "
            "weights): a NaN cannot be repaired, so with clamp or reject the guard failed "
            "those RPCs with INTERNAL. Find the model version from the alert labels and roll "
            "it back."
        )
        .datasource(DATASOURCE)
        .span(6)
        .height(8)
        .unit("short")
        .thresholds(_thresholds((None, "green"), (1, "red")))
        .with_target(
            _query(
                f"sum by (model, output, kind) (increase(guard_output_violations_total{{"
                f'{SEL_OUTPUT}, kind=~"nan|inf"}}[$__range]))',
                "{{model}} / {{output}} / {{kind}}",
                instant=True,
            )
        ),
        _timeseries(
            "Bad softmax rows",
            "Rows per second whose values do not sum to 1 within sum_tolerance (only outputs "
            "with check_sum: true). Non-zero means the output is not a softmax over the last "
            "axis: wrong activation in the config, logits exported instead of "
            "probabilities, or a half-precision overflow. Check the model signature with "
            "'guard check --upstream' and fix the rule or the model.",
            "ops",
            _query(
                f"sum by (model, output) (rate(guard_output_sum_violations_total"
                f"{{{SEL_OUTPUT}}}{RATE}))",
                "{{model}} / {{output}}",
            ),
        ).span(18),
        heatmap.Panel()
        .title("Output value distribution")
        .description(
            "Histogram of output values (single-value outputs) or of each row's top value "
            "(multi-class outputs). Buckets resolve 1.001, 1.01, 1.1, 2, 10 and +Inf above 1, "
            "and -0.001 .. -1 below 0: any colour in those rows is a value outside [0, 1]. "
            "A band just above 1 is the WideDeep/sigmoid-plus-linear bug. Mass piling at "
            "the top of [0, 1] on a softmax output can mean an over-confident model."
        )
        .datasource(DATASOURCE)
        .span(12)
        .height(10)
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .fill("dark-orange")
        )
        .y_axis(heatmap.YAxisConfig().unit("none").decimals(3))
        .cell_values(heatmap.CellValues().unit("ops"))
        .show_tooltip()
        .with_target(
            _query(
                f"sum by (le) (rate(guard_output_value_bucket{{{SEL_OUTPUT}}}{RATE}))",
                "{{le}}",
            ).format(PromQueryFormat.HEATMAP)
        ),
        bargauge.Panel()
        .title("Top predicted classes")
        .description(
            "The 10 most frequent derived classes (threshold/argmax) in the selected range, "
            "by label or index. A class distribution that suddenly collapses onto one class "
            "is a dead model or a broken preprocessing step; compare with the previous day. "
            "__other__ collects classes beyond max_class_label_values."
        )
        .datasource(DATASOURCE)
        .span(12)
        .height(10)
        .unit("short")
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .orientation(common.VizOrientation.HORIZONTAL)
        .with_target(
            _query(
                "topk(10, sum by (model, output, class) (increase(guard_predicted_class_total"
                f"{{{SEL_OUTPUT}}}[$__range])))",
                "{{model}} / {{output}} / {{class}}",
                instant=True,
            )
        ),
    ]


def _response_panels() -> list[Any]:
    responses = f"guard_responses_total{{{SEL_SIGNATURE}}}"
    return [
        _timeseries(
            "Responses by action",
            "Checked Predict responses per second by what the guard did: clean (no "
            "violation), observed (violation passed through, on_violation: observe), clamped "
            "(repaired), rejected (failed with INTERNAL). Clients see rejected responses as "
            "errors: if this grows, roll back the model or switch the output to clamp.",
            "reqps",
            _query(f"sum by (model, action) (rate({responses}{RATE}))", "{{model}} {{action}}"),
        ),
        _timeseries(
            "Share of responses by action",
            "Fraction of each model's checked responses per action. A healthy model is "
            "~100% clean. A rising clamped/observed share means the model drifted out of "
            "range; any rejected share is client-visible failures (GuardRejectingResponses).",
            "percentunit",
            _query(
                f"sum by (model, action) (rate({responses}{RATE}))"
                f" / ignoring (action) group_left sum by (model) (rate({responses}{RATE}))",
                "{{model}} {{action}}",
            ),
        ).max(1),
    ]


def _traffic_panels() -> list[Any]:
    return [*_protocol_panels(), *_latency_panels()]


def _protocol_panels() -> list[Any]:
    requests = f"guard_requests_total{{{SEL_TRAFFIC}}}"
    errors = f'guard_requests_total{{{SEL_TRAFFIC}, code!="OK"}}'
    return [
        _timeseries(
            "Requests by protocol",
            "Calls per second through the guard by protocol: grpc (port 8500) and rest "
            "(port 8501, TF Serving's REST API). One protocol dropping to zero while its "
            "clients still run means they bypass the guard or cannot reach it: check the "
            "Service port, the NetworkPolicy and rest_upstream.",
            "reqps",
            _query(f"sum by (protocol) (rate({requests}{RATE}))", "{{protocol}}"),
        ),
        _timeseries(
            "Error ratio by protocol",
            "Share of calls per protocol that did not end OK (codes are gRPC names for both; "
            "REST statuses are mapped as TF Serving maps them). A ratio on one protocol only "
            "points at that path: for rest, a wrong rest_upstream or TF Serving's REST port "
            "off (UNAVAILABLE, GuardProtocolUnavailable); for both, the model or the rules.",
            "percentunit",
            _query(
                f"(sum by (protocol) (rate({errors}{RATE}))"
                f" or sum by (protocol) (rate({requests}{RATE})) * 0)"
                f" / sum by (protocol) (rate({requests}{RATE}))",
                "{{protocol}}",
            ),
        ).max(1),
        _timeseries(
            "Request rate by protocol, method and code",
            "Calls per second through the guard, by protocol, TF Serving method and status "
            "code (gRPC code names; a REST status is counted under the code TF Serving maps "
            "to it). A drop to zero with clients still running means they bypass or cannot "
            "reach the guard (Service selector, ports 8500 and 8501).",
            "reqps",
            _query(
                f"sum by (protocol, method, code) (rate({requests}{RATE}))",
                "{{protocol}} {{method}} {{code}}",
            ),
        ),
        _timeseries(
            "Error rate by protocol, method and code",
            "Non-OK calls per second. UNAVAILABLE: TF Serving is down or restarting (see "
            "'Upstream up'), or for rest only, rest_upstream does not reach TF Serving's "
            "REST port. INTERNAL: the guard rejected a response or could not decode it. "
            "NOT_FOUND / INVALID_ARGUMENT come from TF Serving unchanged (unknown model, "
            "bad request): fix the client.",
            "reqps",
            _query(
                f"sum by (protocol, method, code) (rate({errors}{RATE}))",
                "{{protocol}} {{method}} {{code}}",
            ),
        ),
    ]


def _quantiles(metric: str) -> list[Any]:
    selector = f"{metric}_bucket{{{SEL_PROTOCOL}}}"
    return [
        _query(
            f"histogram_quantile({q}, sum by (le, protocol, method) (rate({selector}{RATE})))",
            f"p{name} {{{{protocol}}}} {{{{method}}}}",
            ref,
        )
        for q, name, ref in ((0.5, "50", "A"), (0.99, "99", "B"))
    ]


def _latency_panels() -> list[Any]:
    return [
        _timeseries(
            "Upstream latency p50 / p99",
            "Time TF Serving took to answer, measured by the guard, per protocol and method. "
            "High values are TF Serving's own (model size, batching, GPU contention), not the "
            "guard's; REST adds TF Serving's own JSON encoding to the upstream time.",
            "s",
            *_quantiles("guard_upstream_duration_seconds"),
        ),
        _timeseries(
            "Guard overhead p50 / p99",
            "Time spent inside the guard per call (decode, rules, encode), excluding the "
            "upstream call, per protocol and method. Expect well under a millisecond for "
            "typical gRPC responses; REST reads and writes JSON, so large REST responses cost "
            "more. A high p99 means very large responses or a CPU-starved sidecar: raise its "
            "CPU request/limit (GuardHighOverhead).",
            "s",
            *_quantiles("guard_overhead_seconds"),
        ),
    ]


def _health_panels() -> list[Any]:
    return [
        stat.Panel()
        .title("Upstream up")
        .description(
            "1 while the guard's health checks reach TF Serving, per guard instance. DOWN "
            "means clients get UNAVAILABLE: check the tensorflow-serving container (logs, "
            "OOM kills, GPU) in that pod (GuardUpstreamDown)."
        )
        .datasource(DATASOURCE)
        .span(6)
        .height(6)
        .mappings(
            [
                dm.ValueMap(
                    options={
                        "0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
                        "1": dm.ValueMappingResult(text="UP", color="green", index=1),
                    }
                )
            ]
        )
        .thresholds(_thresholds((None, "red"), (1, "green")))
        .with_target(_query("min by (instance) (guard_upstream_up)", "{{instance}}", instant=True)),
        stat.Panel()
        .title("In-flight requests")
        .description(
            "RPCs currently inside the guard, summed over instances. Near "
            "max_concurrent_rpcs (default 1024) new RPCs queue: scale out the Deployment."
        )
        .datasource(DATASOURCE)
        .span(6)
        .height(6)
        .unit("short")
        .with_target(_query("sum(guard_inflight_requests)", "in flight", instant=True)),
        _timeseries(
            "Undecodable upstream responses",
            "Predict responses from TF Serving that the guard could not parse; clients got "
            "INTERNAL. This should never happen with a real TF Serving: check that upstream "
            "points at TF Serving's gRPC port and not at something else.",
            "ops",
            _query(
                f"sum by (model) (rate(guard_decode_errors_total{{{SEL_MODEL}}}{RATE}))",
                "{{model}}",
            ),
        ),
    ]


def _protection_panels() -> list[Any]:
    return [
        _timeseries(
            "Refused calls by reason",
            "Calls the guard refused to protect itself, per second, by the limit that refused "
            "them: metadata (max_metadata_kb/entries), pending_requests, request_timeout "
            "(a request that never completed), request_too_large (max_request_mb), "
            "inflight_calls / inflight_bytes (max_concurrent_rpcs, max_inflight_mb), "
            "relayed_streams (max_relayed_streams), "
            "response_too_large (max_message_mb), stream_idle (stream_idle_timeout_s), "
            "connections (max_connections, REST). Clients got the limit's name in the error "
            "details (GuardRefusingCalls).",
            "reqps",
            _query(
                "sum by (reason) (rate(guard_refused_requests_total[$__rate_interval]))",
                "{{reason}}",
            ),
        ),
        _timeseries(
            "Calls receiving and bytes in flight",
            "Calls whose request has not fully arrived (bounded by max_pending_requests and "
            "request_timeout_s), streaming calls relayed (bounded by max_relayed_streams), and "
            "the bytes of requests and responses that calls in flight hold, answers their "
            "clients have not taken yet included (bounded by max_inflight_mb). A plateau at a "
            "limit means refusals.",
            "short",
            _query("sum(guard_pending_requests)", "receiving"),
            _query("sum(guard_relayed_streams)", "streams relayed", "C"),
            _query("sum(guard_inflight_bytes)", "bytes in flight", "B"),
        ),
        stat.Panel()
        .title("Server restarts, memory resets, worker restarts")
        .description(
            "Over the dashboard's range: times a guard's gRPC server stopped by itself and was "
            "started again on the same port, each a client sending malformed HTTP/2 (a method "
            "name that is not UTF-8, in grpcio 1.85; calls in flight were not lost, "
            "GuardServerRestarted); times a guard passed max_memory_mb and closed every "
            "gRPC client connection (GuardMemoryCeiling); and, under --workers, workers the "
            "supervisor replaced because they exited or their event loop stalled "
            "(GuardWorkerRestarted)."
        )
        .datasource(DATASOURCE)
        .span(6)
        .height(6)
        .unit("short")
        .with_target(
            _query("sum(increase(guard_server_restarts_total[$__range]))", "restarts", instant=True)
        )
        .with_target(
            _query("sum(increase(guard_memory_resets_total[$__range]))", "resets", instant=True)
        )
        .with_target(
            _query(
                "sum(increase(guard_worker_restarts_total[$__range]))",
                "worker restarts",
                instant=True,
            )
        ),
    ]


BY_OUTPUT = "model, signature, output"


def _model_health_panels() -> list[Any]:
    """Outputs that are valid but useless: near-uniform, stuck, abstaining, drifting."""
    near = f"guard_near_uniform_rows_total{{{SEL_OUTPUT}}}"
    rows = f"guard_output_entropy_count{{{SEL_OUTPUT}}}"
    classes = f"guard_predicted_class_total{{{SEL_OUTPUT}}}"
    return [
        _timeseries(
            "Near-uniform rows",
            "Share of a multi-class output's rows whose normalised entropy H/ln(classes) is "
            "at or above near_uniform_entropy (default 0.98): the probability is spread "
            "almost evenly, so the argmax is noise. Near 100% is an untrained model or the "
            "wrong weights loaded (seed 004: 1/201 per class). GuardModelNearUniform fires "
            "above 50% for 10 minutes: roll back the model version.",
            "percentunit",
            _query(
                f"sum by ({BY_OUTPUT}) (rate({near}{RATE})) / sum by ({BY_OUTPUT}) "
                f"(rate({rows}{RATE}))",
                "{{model}} / {{output}}",
            ),
        ),
        heatmap.Panel()
        .title("Output entropy distribution")
        .description(
            "Histogram of each row's normalised entropy (0 one-hot, 1 uniform), with fine "
            "buckets between 0.9 and 1. A trained classifier keeps most rows well below 0.9; "
            "mass in the 0.999-1 bucket is a model that does not discriminate at all. A "
            "slow shift to the right after a data change means the model is less sure."
        )
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Blues"))
        .y_axis(heatmap.YAxisConfig().unit("none").decimals(3))
        .with_target(
            _query(
                f"sum by (le) (rate(guard_output_entropy_bucket{{{SEL_OUTPUT}}}{RATE}))",
                "{{le}}",
            ).format(PromQueryFormat.HEATMAP)
        ),
        _timeseries(
            "Top class share",
            "The share of predictions taken by the most frequent class, for outputs with "
            "more than two classes (guard_output_classes). Near 1 means the model answers the "
            "same for every input: constant inputs or a collapsed model (GuardModelStuck "
            "fires at 99% over 30 minutes). If that class is the abstain label, the model is "
            "unsure on everything: see the near-uniform panel.",
            "percentunit",
            _query(
                f"(max by ({BY_OUTPUT}) (sum by ({BY_OUTPUT}, class) (rate({classes}{RATE})))"
                f" / sum by ({BY_OUTPUT}) (rate({classes}{RATE})))"
                f" and on ({BY_OUTPUT}) max by ({BY_OUTPUT}) "
                f"(guard_output_classes{{{SEL_OUTPUT}}}) > 2",
                "{{model}} / {{output}}",
            ),
        ),
        _timeseries(
            "Abstentions",
            "Predictions per second below min_confidence, answered with class -1 and the "
            "abstain_label, and their share of all predictions. A rising share means the "
            "model is less sure than it used to be (harder inputs, drift, a worse version); "
            "a share near 100% is a model that cannot decide at all.",
            "short",
            _query(
                f"sum by ({BY_OUTPUT}) (rate(guard_abstentions_total{{{SEL_OUTPUT}}}{RATE}))",
                "{{model}} / {{output}} per s",
            ),
            _query(
                f"sum by ({BY_OUTPUT}) (rate(guard_abstentions_total{{{SEL_OUTPUT}}}{RATE}))"
                f" / sum by ({BY_OUTPUT}) (rate({classes}{RATE}))",
                "{{model}} / {{output}} share",
                "B",
            ),
        ),
        _timeseries(
            "Confidence drift (PSI)",
            "Population stability index of the confidence over the last drift_window rows "
            "against the output's configured baseline. Below 0.1: stable; 0.1-0.25: a "
            "moderate shift (GuardOutputDrift warning); above 0.25: a major shift "
            "(critical). Check whether the inputs or the model version changed, and take a "
            "new baseline only when the change is intended.",
            "none",
            _query(
                f"max by ({BY_OUTPUT}) (guard_output_drift_psi{{{SEL_OUTPUT}}})",
                "{{model}} / {{output}}",
            ),
        ).thresholds(_thresholds((None, "green"), (0.1, "orange"), (0.25, "red"))),
    ]


def build() -> dict[str, Any]:
    """Build the dashboard and return it as a JSON-compatible dict."""
    builder = (
        db.Dashboard("TF Serving Guard")
        .uid(UID)
        .description(
            "Model output quality and traffic of tf-serving-guard sidecars in front of "
            "TensorFlow Serving."
        )
        .tags(["tf-serving-guard", "tensorflow-serving"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .variables(_variables())
        .with_row(db.Row("Output quality"))
    )
    for panel in _quality_panels():
        builder = builder.with_panel(panel)
    builder = builder.with_row(db.Row("Responses"))
    for panel in _response_panels():
        builder = builder.with_panel(panel)
    builder = builder.with_row(db.Row("Traffic and upstream"))
    for panel in [*_traffic_panels(), *_health_panels()]:
        builder = builder.with_panel(panel)
    builder = builder.with_row(db.Row("Protection"))
    for panel in _protection_panels():
        builder = builder.with_panel(panel)
    builder = builder.with_row(db.Row("Model health"))
    for panel in _model_health_panels():
        builder = builder.with_panel(panel)
    encoded: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return encoded


def render() -> str:
    """Return the dashboard as the exact text committed in guard-dashboard.json."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) guard-dashboard.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
