"""Short dtype names used by configs and CLI flags (``fp32``, ``bf16``, ``fp16``) ↔ torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "torch_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` → ``torch.bfloat16``; ``None`` and ``"auto"`` → ``None`` (keep what is there).

    Raises:
        ValueError: For an unknown name.
    """
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]
