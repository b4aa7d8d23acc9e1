"""The bounded cache of the data plane and the servers' lookups.

Keys repeat in steady traffic (a few models, signatures, layouts), so a full
cache is simply cleared: each key then costs one miss, and whatever a client
sends, the cache holds at most ``max_entries`` entries whose keys each weigh
at most ``max_key_bytes``, and, where values can be large (the lanes), values
that weigh at most ``max_value_bytes`` together. A miss here costs
microseconds. The REST model metadata cache
(:mod:`guard.server.rest.signatures`) is the one other: a miss there costs a
round trip to the upstream, so it drops the least recently used entries
rather than all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A dict with at most ``max_entries`` entries.

    ``weigh`` gives a key's size in bytes; keys over ``max_key_bytes`` are
    never stored (a lookup of such a key always misses). ``weigh_value``
    gives a value's: the values stored weigh at most ``max_value_bytes``
    together (the cache is cleared first when one more would pass it), and a
    value heavier than that alone is never stored.
    """

    __slots__ = (
        "_data", "_max_entries", "_max_key_bytes", "_weigh", "_max_value_bytes",
        "_weigh_value", "_value_bytes", "_weights",
    )  # fmt: skip

    def __init__(
        self,
        max_entries: int,
        *,
        max_key_bytes: int | None = None,
        weigh: Callable[[K], int] | None = None,
        max_value_bytes: int | None = None,
        weigh_value: Callable[[V], int] | None = None,
    ) -> None:
        if (max_key_bytes is None) != (weigh is None):
            raise ValueError("give max_key_bytes and weigh together")
        if (max_value_bytes is None) != (weigh_value is None):
            raise ValueError("give max_value_bytes and weigh_value together")
        self._data: dict[K, V] = {}
        self._max_entries = max_entries
        self._max_key_bytes = max_key_bytes
        self._weigh = weigh
        self._max_value_bytes = max_value_bytes
        self._weigh_value = weigh_value
        self._value_bytes = 0
        """What the stored values weigh together (with ``weigh_value``)."""
        self._weights: dict[K, int] = {}
        """Each stored value's weight (with ``weigh_value``)."""

    def __len__(self) -> int:
        return len(self._data)

    @property
    def value_bytes(self) -> int:
        """What the stored values weigh together (0 without ``weigh_value``)."""
        return self._value_bytes

    def get(self, key: K, default: Any = None) -> V | Any:
        """The cached value, or ``default``."""
        return self._data.get(key, default)

    @property
    def lookup(self) -> Callable[[K], V]:
        """The underlying dict's ``__getitem__`` (raises ``KeyError`` on a miss),
        for ``map`` over many keys at C speed."""
        return self._data.__getitem__

    def put(self, key: K, value: V) -> None:
        """Store ``value`` unless the key or the value is too heavy; clear
        first when full (in entries, or in the values' bytes)."""
        if self._weigh is not None and self._weigh(key) > (self._max_key_bytes or 0):
            return
        if self._weigh_value is not None:
            self._put_weighed(key, value)
            return
        data = self._data
        if len(data) >= self._max_entries and key not in data:
            data.clear()
        data[key] = value

    def _put_weighed(self, key: K, value: V) -> None:
        assert self._weigh_value is not None and self._max_value_bytes is not None
        weight = self._weigh_value(value)
        data = self._data
        self._value_bytes -= self._weights.pop(key, 0)
        data.pop(key, None)
        if weight > self._max_value_bytes:
            return
        if len(data) >= self._max_entries or self._value_bytes + weight > self._max_value_bytes:
            self.clear()
        data[key] = value
        self._weights[key] = weight
        self._value_bytes += weight

    def get_or_make(self, key: K, make: Callable[..., V], *args: Any) -> V:
        """The cached value, or ``make(*args)``, stored if it may be, on a miss."""
        try:
            return self._data[key]
        except KeyError:
            pass
        value = make(*args)
        self.put(key, value)
        return value

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()
        self._weights.clear()
        self._value_bytes = 0
