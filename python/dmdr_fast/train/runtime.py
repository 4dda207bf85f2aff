"""Process-wide run settings: the training device, and deterministic algorithms scoped to a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dmdr_fast.train.distributed import local_device

__all__ = ["deterministic_algorithms", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` → a device (``"auto"``: CUDA if available, else CPU; under torchrun each
    process its ``cuda:LOCAL_RANK``)."""
    return local_device(name)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block, the caller's
    setting (flag and ``warn_only``) restored afterwards; nothing changes when ``enabled`` is false."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
