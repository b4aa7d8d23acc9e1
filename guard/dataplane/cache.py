"""The bounded cache of the data plane and the servers' lookups.

Keys repeat in steady traffic (a few models, signatures, layouts), so a full
cache is simply cleared: each key then costs one miss, and whatever a client
sends, the cache holds at most ``max_entries`` entries whose keys each weigh
at most ``max_key_bytes``. A miss here costs microseconds. The REST model
metadata cache (:mod:`guard.server.rest.signatures`) is the one other: its
values weigh up to a megabyte and a miss costs a round trip to the
upstream, so it weighs values and drops the least recently used.
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
    never stored (a lookup of such a key always misses).
    """

    __slots__ = ("_data", "_max_entries", "_max_key_bytes", "_weigh")

    def __init__(
        self,
        max_entries: int,
        *,
        max_key_bytes: int | None = None,
        weigh: Callable[[K], int] | None = None,
    ) -> None:
        if (max_key_bytes is None) != (weigh is None):
            raise ValueError("give max_key_bytes and weigh together")
        self._data: dict[K, V] = {}
        self._max_entries = max_entries
        self._max_key_bytes = max_key_bytes
        self._weigh = weigh

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, default: Any = None) -> V | Any:
        """The cached value, or ``default``."""
        return self._data.get(key, default)

    @property
    def lookup(self) -> Callable[[K], V]:
        """The underlying dict's ``__getitem__`` (raises ``KeyError`` on a miss),
        for ``map`` over many keys at C speed."""
        return self._data.__getitem__

    def put(self, key: K, value: V) -> None:
        """Store ``value`` unless the key is too heavy; clear first when full."""
        if self._weigh is not None and self._weigh(key) > (self._max_key_bytes or 0):
            return
        data = self._data
        if len(data) >= self._max_entries and key not in data:
            data.clear()
        data[key] = value

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
