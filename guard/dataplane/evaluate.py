"""Protocol-neutral evaluation: decoded outputs in, a typed verdict out.

Each front-end decodes its own wire format (protobuf for gRPC), asks
:func:`resolve` whose response it is, hands the decoded arrays to
:func:`evaluate`, counts the verdict with :func:`record` and encodes what the
verdict says to change and to add.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from guard.dataplane.book import CompiledRule, RuleBook, SignatureRules
from guard.dataplane.errors import OutputShapeError, ResponseTooLargeError, shown
from guard.dataplane.results import Action, Array, OutputResult
from guard.dataplane.rules import apply_rule
from guard.dataplane.rulespec import SERVING_DEFAULT
from guard.dataplane.sink import MetricsSink

__all__ = ["OutputVerdict", "Target", "Verdict", "evaluate", "record", "resolve"]


class Target(NamedTuple):
    """Whose response it is, and the rules that apply to it (a NamedTuple:
    made per response, at half a frozen dataclass's cost)."""

    rules: SignatureRules
    model: str
    signature: str
    version: str
    model_label: str


def resolve(
    book: RuleBook,
    model: str,
    signature: str,
    version: int | None,
    metrics: MetricsSink,
) -> Target | None:
    """The target of a response, or ``None`` when no rule matches it.

    ``signature`` may be empty (TF Serving's default signature).
    """
    signature = signature or SERVING_DEFAULT
    rules = book.for_signature(model, signature)
    if rules is None:
        return None
    version_label = "" if version is None else str(version)
    return Target(rules, model, signature, version_label, metrics.model_label(model))


@dataclass(frozen=True, slots=True)
class OutputVerdict:
    """One checked output: its name, what its rule did, and the rule."""

    name: str
    result: OutputResult
    compiled: CompiledRule

    def derived_names(self) -> list[str]:
        """The names of the outputs the rule adds."""
        return [self.name + d.suffix for d in self.result.derived]


@dataclass(slots=True)
class Verdict:
    """What guarding one response decided."""

    outputs: list[OutputVerdict] = field(default_factory=list)
    action: Action = Action.CLEAN
    violations: int = 0
    rejection: str | None = None
    """The first rejected output's reason, when ``action`` is ``REJECTED``."""

    @property
    def changed(self) -> bool:
        """Whether any original tensor must be written again."""
        return any(o.result.changed for o in self.outputs)


def evaluate(target: Target, decoded: Iterable[tuple[str, Array]], room: int) -> Verdict:
    """Apply each output's rule to its decoded values.

    ``decoded`` holds the outputs that have a rule, by name. ``room`` is what
    the response may still grow by (the message limit, less what decoding
    took): derived outputs that could need more are refused before they are
    made, with :class:`~guard.dataplane.errors.ResponseTooLargeError`. A rule
    that cannot fit its tensor raises a :class:`~guard.dataplane.errors.GuardError`.
    """
    verdict = Verdict()
    for name, values in decoded:
        compiled = target.rules.rule_for(name)
        assert compiled is not None, "decoded outputs are the ones with a rule"
        room -= compiled.derived_bytes(values.shape, values.itemsize)
        if room < 0:
            raise ResponseTooLargeError(
                f"guard: model '{shown(target.model)}' output '{shown(name)}': its derived "
                f"outputs ({values.size} values in) would take the response past the "
                "max_message_mb limit; raise max_message_mb in the guard config, or derive "
                "less (threshold, argmax, top_k, labels)"
            )
        result = apply_rule(values, compiled.rule, compiled.labels, target.model, name)
        verdict.outputs.append(OutputVerdict(name, result, compiled))
        verdict.violations += result.counts.total
        verdict.action = max(verdict.action, result.action)
        if result.rejection and verdict.rejection is None:
            verdict.rejection = result.rejection
    return verdict


def record(verdict: Verdict, target: Target, metrics: MetricsSink) -> None:
    """Count what ``verdict`` decided: each output's series, then the response."""
    for out in verdict.outputs:
        sink = metrics.output_recorder(
            target.model_label, target.version, target.signature, out.name
        )
        sink.record(out.result, out.compiled.labels, out.compiled.rule)
    labels = (target.model_label, target.version, target.signature)
    metrics.response_counter(*labels, verdict.action).inc()


def check_derived_names(verdict: Verdict, upstream_names: Collection[str], model: str) -> None:
    """Refuse a derived output that would replace one the model returns."""
    for out in verdict.outputs:
        for derived in out.derived_names():
            if derived in upstream_names:
                raise OutputShapeError(
                    f"guard: model '{shown(model)}' output '{shown(out.name)}': the derived "
                    f"output '{shown(derived)}' would replace an output the model returns; "
                    "drop the rule's threshold/argmax/top_k or rename the model's output"
                )
