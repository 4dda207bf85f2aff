"""Exact peak memory of CPU tensors: a dispatch mode that tracks the live bytes of tensor storages.

``tracemalloc`` does not see torch tensors and the process's RSS mixes the allocator's caching and
the interpreter in; on the CPU the honest number is the bytes of tensor storages alive at each
moment. :class:`LiveTensorBytes` sees every tensor an ATen op returns (parameters, gradients,
optimiser states, activations saved for backward, temporaries), keeps a weak reference to its
storage (:class:`torch.multiprocessing.reductions.StorageWeakRef`, which expires when the storage is freed) and
its size, and updates the peak after each allocation. It is deterministic: the same run gives the
same peak to the byte. It does not see allocations that no ATen op returns (kernel workspaces,
``torch.tensor`` of Python data, tensors built before the mode was entered).

This is the measurement :mod:`dmdr_fast.plan.memory`'s activation constants come from and the
planner's validation test (``tests/plan/test_validation.py``) checks the estimate against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: ...`` → ``m.live`` / ``m.peak`` bytes of tensor storages.

    Attributes:
        live: bytes of the storages created inside the mode that are still alive (after
            :meth:`sweep`).
        peak: the largest ``live`` seen right after an allocation.
        at_peak: storage id → (weak reference, bytes) of what was alive at the peak (``record=True``), so that a
            caller can split the peak into its own categories (:meth:`bytes_at_peak`).
    """

    def __init__(self, *, record: bool = False) -> None:
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._record = record
        self.live = 0
        self.peak = 0
        self.at_peak: dict[int, tuple[StorageWeakRef, int]] = {}

    def bytes_at_peak(self, tensors: list[torch.Tensor]) -> int:
        """Bytes of the distinct storages of ``tensors`` that were alive at the peak.

        A storage alive at the peak and still alive now is the same one (its address cannot have
        been reused meanwhile), so address equality is identity for those."""
        keys = {t.untyped_storage()._cdata for t in tensors}
        return sum(size for key, (ref, size) in self.at_peak.items() if key in keys and not ref.expired())

    def sweep(self) -> int:
        """Forget the freed storages; returns the live bytes."""
        dead = [key for key, (ref, _) in self._storages.items() if ref.expired()]
        for key in dead:
            self.live -= self._storages.pop(key)[1]
        return self.live

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes (e.g. after the models are built)."""
        self.peak = self.sweep()
        self._snapshot()

    def _snapshot(self) -> None:
        if self._record:
            self.at_peak = dict(self._storages)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        added = 0
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            known = self._storages.get(key)
            if known is not None and not known[0].expired():
                continue  # a view or an in-place result: already counted
            if known is not None:  # a freed storage's address reused before a sweep
                self.live -= known[1]
            size = storage.nbytes()
            self._storages[key] = (StorageWeakRef(storage), size)
            self.live += size
            added += size
        # The peak can only rise on an allocation; sweeping then (not on every op) keeps it exact
        # and cheap: freed storages are subtracted before the comparison.
        if added and self.live > self.peak and self.sweep() > self.peak:
            self.peak = self.live
            self._snapshot()
        return out
