"""Reading a config's YAML within bounds: values after aliases, nesting depth.

A YAML alias repeats a whole subtree without repeating its text, so a file of
a few hundred bytes can stand for a billion values ("billion laughs"): the
validation walk, and any message that shows such a value, would then take the
guard's memory and minutes of CPU, inside the serving process on a reload.
Before anything is built, one pass over the parser's events counts the values
the document holds once every alias is expanded, and how deep it nests (the
composer recurses, so a deep document would otherwise end in a
``RecursionError``). libyaml's parser and constructor are used where PyYAML
has them: about ten times faster than the pure-Python ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MAX_DEPTH", "MAX_VALUES", "YamlBoundError", "load_yaml"]

# A large real config (a thousand models, 100,000 inline labels) holds a few
# hundred thousand values; building 500,000 takes about 2 s and 150 MB.
MAX_VALUES = 500_000
# The config's own schema nests 6 levels deep.
MAX_DEPTH = 64

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Yaml12Loader(_Base):  # type: ignore[misc]
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


class YamlBoundError(ValueError):
    """The document is larger or deeper than a config may be."""


@dataclass
class _Open:
    """A collection whose end has not been read yet."""

    anchor: str | None
    values: int = 1
    depth: int = 1


@dataclass
class _Count:
    """Values and depth so far, with aliases expanded."""

    values: int = 0
    open: list[_Open] = field(default_factory=list)
    anchors: dict[str, tuple[int, int]] = field(default_factory=dict)

    def event(self, event: yaml.Event) -> None:
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent):
            self._read(*self.anchors.get(str(anchor), (1, 0)), line)
        elif isinstance(event, yaml.ScalarEvent):
            self._read(1, 0, line)
            if anchor is not None:
                self.anchors[anchor] = (1, 0)
        elif isinstance(event, yaml.CollectionStartEvent):
            self._grow(1, 1, line)
            self.open.append(_Open(anchor))
        elif isinstance(event, yaml.CollectionEndEvent):
            done = self.open.pop()
            if done.anchor is not None:
                self.anchors[done.anchor] = (done.values, done.depth)
            self._into_parent(done.values, done.depth)

    def _read(self, values: int, depth: int, line: int) -> None:
        """A whole value (a scalar, or an alias's subtree) was read."""
        self._grow(values, depth, line)
        self._into_parent(values, depth)

    def _into_parent(self, values: int, depth: int) -> None:
        if self.open:
            parent = self.open[-1]
            parent.values += values
            parent.depth = max(parent.depth, depth + 1)

    def _grow(self, values: int, depth: int, line: int) -> None:
        self.values += values
        if self.values > MAX_VALUES:
            raise YamlBoundError(
                f"line {line}: the document holds more than {MAX_VALUES:,} values once its "
                "aliases (*name) are expanded; a config this large is a mistake, or an attack "
                "(repeated aliases): write the repeated part fewer times, and put long label "
                "lists in labels_file"
            )
        if len(self.open) + depth > MAX_DEPTH:
            raise YamlBoundError(
                f"line {line}: nested more than {MAX_DEPTH} levels deep once its aliases are "
                "expanded; the config's own fields nest 6 levels deep"
            )


def load_yaml(text: str) -> Any:
    """The document in ``text``. Raises :class:`YamlBoundError` past the
    bounds, ``yaml.YAMLError`` where it is not valid YAML."""
    count = _Count()
    for event in yaml.parse(text, Loader=_Yaml12Loader):
        count.event(event)
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
