"""The one bounded cache of repeated message heads (parsed request heads, tensor header
plans, encoded heads) on both ends of a socket and of a worker's channel."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(dict[K, V], Generic[K, V]):
    """A dict of repeated message heads (parsed request heads, encoded tensor plans) that
    forgets everything when full: a program repeats a handful of heads, and one with more
    distinct heads than ``size`` gains nothing from a cache (no LRU bookkeeping per hit)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: K, value: V) -> V:
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
