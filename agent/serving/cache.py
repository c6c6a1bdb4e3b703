"""The one bounded cache of repeated message heads (parsed request heads, tensor header
plans, encoded heads) on both ends of a socket and of a worker's channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(dict[K, V], Generic[K, V]):
    """A dict of repeated message heads (parsed request heads, encoded tensor plans) that
    forgets everything when full: a program repeats a handful of heads, and one with more
    distinct heads than ``size`` gains nothing from a cache (no LRU bookkeeping per hit).

    ``keeps``: whether a key is small enough to keep. A key copied from what a sender
    wrote (a header, a request id) must be bounded: 256 distinct 64 MiB headers would
    otherwise stay in memory. A key it refuses is simply not remembered."""

    def __init__(self, size: int, keeps: Callable[[K], bool] | None = None) -> None:
        super().__init__()
        self.size = size
        self.keeps = keeps

    def remember(self, key: K, value: V) -> V:
        if self.keeps is not None and not self.keeps(key):
            return value
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
