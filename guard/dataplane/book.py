"""The rule book: one config's rules, compiled once and matched per response.

Immutable and swapped whole on reload, so one request always sees one
consistent rule set (Envoy's shared filter config, in spirit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.dataplane import kernels as kernels_module
from guard.dataplane.cache import BoundedCache
from guard.dataplane.codec.tensor import Encoding
from guard.dataplane.kernels import Kernels
from guard.dataplane.lanes import Lane, OutputSpec
from guard.dataplane.rules import derived_bytes, label_table, longest_label
from guard.dataplane.rulespec import ANY, ModelRule, OutputRule
from guard.dataplane.sink import LabelTable

__all__ = ["CompiledRule", "RuleBook", "SignatureRules"]

# Clients and upstreams choose model, signature and output names: every cache
# keyed by them is bounded in entries and in key bytes.
_NAMES_MAX_BYTES = 1024
_SIGNATURES_MAX = 4096
_LANES_MAX = 256
# Lanes per (model, signature) hold their encoded heads and any per-class
# threshold table: the upstream declares the shapes, so the bytes are bounded too.
_LANES_MAX_BYTES = 4 << 20
_PLANS_MAX = 4096
# A plan keeps its lanes alive after the lane cache lets them go: their bytes
# are bounded here too (400 shapes of a 20,000-class threshold: 61.5 MiB).
_PLANS_MAX_BYTES = 16 << 20
_TEXTS_MAX = 1024


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """An output rule with its labels encoded once."""

    rule: OutputRule
    labels: LabelTable | None
    longest: int = 0
    """The longest label's bytes, the abstain label's included (0: no labels)."""

    @classmethod
    def of(cls, rule: OutputRule, labels: LabelTable | None = None) -> CompiledRule:
        """``rule`` with its labels encoded (or ``labels``, encoded already) and measured."""
        if labels is None:
            labels = label_table(rule.labels)
        return cls(rule, labels, longest_label(rule, labels))

    def derived_bytes(self, shape: tuple[int, ...], itemsize: int) -> int:
        """:func:`~guard.dataplane.rules.derived_bytes` for this rule and its labels."""
        return derived_bytes(self.rule, shape, itemsize, self.labels is not None, self.longest)


class SignatureRules:
    """Rules resolved for one (model, signature): output name -> rule."""

    def __init__(
        self,
        candidates: Sequence[ModelRule],
        kernels: Kernels,
        compile_rule: Callable[[OutputRule], CompiledRule] = CompiledRule.of,
    ) -> None:
        # ``candidates`` are ordered most specific first (exact model, then exact
        # signature); the first one with any match for an output wins, and within
        # it an exact output name beats ``*``.
        self._levels: list[tuple[dict[str, CompiledRule], CompiledRule | None]] = []
        for model_rule in candidates:
            exact: dict[str, CompiledRule] = {}
            wildcard = None
            for rule in model_rule.outputs:
                compiled = compile_rule(rule)
                if rule.name == ANY:
                    wildcard = compiled
                else:
                    exact[rule.name] = compiled
            self._levels.append((exact, wildcard))
        self._kernels = kernels
        self._lanes: BoundedCache[tuple[Any, ...], Lane | None] = BoundedCache(
            _LANES_MAX,
            max_key_bytes=_NAMES_MAX_BYTES,
            weigh=lambda key: len(key[0]),
            max_value_bytes=_LANES_MAX_BYTES,
            weigh_value=_lane_bytes,
        )

    def rule_for(self, output: str) -> CompiledRule | None:
        """The rule for ``output``, or ``None``."""
        for exact, wildcard in self._levels:
            found = exact.get(output)
            if found is not None:
                return found
            if wildcard is not None:
                return wildcard
        return None

    def lane(
        self, name: str, compiled: CompiledRule, values: np.ndarray[Any, Any], encoding: Encoding
    ) -> Lane | None:
        """The native route for this output's shape, dtype and encoding, if any."""
        key = (name, values.shape, values.dtype, encoding)
        spec = OutputSpec(
            name, compiled.rule, compiled.labels, values.shape, values.dtype, encoding
        )
        return self._lanes.get_or_make(key, self._kernels.lane, spec)


def _lane_bytes(lane: Lane | None) -> int:
    """What a cached lane weighs (a ``None``, no lane, weighs its key's share)."""
    return _NO_LANE_BYTES if lane is None else lane.held


_NO_LANE_BYTES = 64


def _plan_bytes(plan: Any) -> int:
    """What a cached plan keeps alive: its lanes (``held``; no plan, ``None``, none)."""
    return _NO_LANE_BYTES + int(getattr(plan, "held", 0))


class RuleBook:
    """The compiled, immutable rule set of one config."""

    def __init__(
        self,
        models: Sequence[ModelRule],
        max_message_bytes: int,
        kernels: Kernels | None = None,
    ) -> None:
        self.models = tuple(models)
        self.max_message_bytes = max_message_bytes
        """The decode budget of one response: its tensors together may not need more."""
        self.kernels = kernels if kernels is not None else kernels_module.default()
        self._exact_names = frozenset(m.name for m in self.models if m.name != ANY)
        self._has_wildcard_model = any(m.name == ANY for m in self.models)
        self._signatures: BoundedCache[tuple[str, str], SignatureRules | None] = BoundedCache(
            _SIGNATURES_MAX,
            max_key_bytes=_NAMES_MAX_BYTES,
            weigh=lambda key: len(key[0]) + len(key[1]),
        )
        # By id: the rules and their labels live in ``models`` as long as the book.
        self._compiled: dict[int, CompiledRule] = {}
        self._tables: dict[int, LabelTable | None] = {}
        self.plans: BoundedCache[tuple[Any, ...], Any] = BoundedCache(
            _PLANS_MAX, max_value_bytes=_PLANS_MAX_BYTES, weigh_value=_plan_bytes
        )
        """The plans per response layout (guard.dataplane.pipeline,
        guard.server.rest.plan): each weighs what its lanes hold (``held``)."""
        self.texts: BoundedCache[tuple[Any, ...], str] = BoundedCache(_TEXTS_MAX)
        """Text a plan wrote for what it decided, to write again (see
        guard.server.rest.plan); each plan keeps only small keys and texts."""

    def may_apply(self, model: str | None) -> bool:
        """Cheap pre-check: could any rule match this model? A request whose
        model is unknown (``None``) may: the response's own spec decides."""
        return model is None or self._has_wildcard_model or model in self._exact_names

    def for_signature(self, model: str, signature: str) -> SignatureRules | None:
        """The rules for one model and signature, or ``None`` if no rule matches."""
        return self._signatures.get_or_make((model, signature), self._resolve, model, signature)

    def _resolve(self, model: str, signature: str) -> SignatureRules | None:
        candidates = [
            m for m in self.models if m.name in (model, ANY) and m.signature in (signature, ANY)
        ]
        candidates.sort(key=lambda m: (m.name != ANY, m.signature != ANY), reverse=True)
        return SignatureRules(candidates, self.kernels, self._compile) if candidates else None

    def _compile(self, rule: OutputRule) -> CompiledRule:
        """``rule`` compiled once per book, whatever signatures resolve to it,
        its label table shared with the rules that share its labels (one file
        named by many rules): each resolved signature made its own tables, 6 MB
        per rule of a 100,000-label file."""
        compiled = self._compiled.get(id(rule))
        if compiled is None:
            table = None
            if rule.labels is not None:
                table = self._tables.get(id(rule.labels))
                if table is None:
                    table = self._tables[id(rule.labels)] = label_table(rule.labels)
            compiled = self._compiled[id(rule)] = CompiledRule.of(rule, table)
        return compiled
