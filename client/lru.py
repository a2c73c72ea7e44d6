"""A least-recently-used map bounded by bytes: what a long-lived process may keep in memory.

A Simulation Engine actor serves site after site, message after message; it may keep what
it computed (prefix features, decoded images) as long as the total stays under a bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    """Values by key, least recently used out first once their sizes exceed `limit_bytes` (0 = off).

    A value larger than the bound on its own is not kept. `limit_bytes` may be changed
    between uses; the next `put` evicts down to it.
    """

    def __init__(self, limit_bytes: int, size: Callable[[V], int]) -> None:
        self.limit_bytes = limit_bytes
        self._size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._nbytes = 0

    def get(self, key: Hashable) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        if key in self._items:
            self._nbytes -= self._size(self._items.pop(key))
        if self._size(value) > self.limit_bytes:
            return
        self._items[key] = value
        self._nbytes += self._size(value)
        while self._nbytes > self.limit_bytes:
            self._nbytes -= self._size(self._items.popitem(last=False)[1])

    def clear(self) -> None:
        self._items.clear()
        self._nbytes = 0
