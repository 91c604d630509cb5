"""Host-side memos of the ops' per-call-signature work (argument checks, planning), shared by the
inference dispatch (:mod:`fx_passes.ops.dispatch`) and the training ops."""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Optional, TypeVar

import torch

V = TypeVar("V")


def tensor_meta(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a call signature records of a tensor: shape, strides, dtype, device."""
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


class LruMemo:
    """A bounded LRU memo: ``get(key, make)`` returns the value made for ``key`` the first time (a model has
    a few call signatures per layer shape and token count; the bound only caps a caller that cycles
    through many)."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._values: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
            return value
        value = make()
        self._values[key] = value
        if len(self._values) > self.size:
            self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)
