"""Cache utilities of the engine: a least-recently-used mapping bounded by the bytes of its values (``ByteLRU``, used
for prepared images, image embeddings, decoder outputs and blending states), one bounded by its length
(``BoundedDict``, for small indexes such as file identity -> content key), and the byte size of a tensor. They hold
no policy of their own: what is cached under which key is the engine's business (``segvol.engine``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Tuple

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ByteLRU:
    """Least-recently-used mapping bounded by the bytes of its values (an entry larger than the bound is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        self.pop(key)
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, int(nbytes))
        self.nbytes += int(nbytes)
        while self.nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (nothing happens when it is not there)."""
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


class BoundedDict(OrderedDict):
    """An ordered mapping that keeps its ``limit`` most recently set keys."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = int(limit)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
