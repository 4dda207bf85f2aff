"""Short dtype names used by configs and CLI flags (``fp32``, ``bf16``, ``fp16``) ↔ torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "load_dtype_kwargs", "torch_dtype"]

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


def load_dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a load dtype: ``dtype=`` where diffusers has it (newer
    releases, e.g. 0.42, deprecate ``torch_dtype=`` and warn on every load), else ``torch_dtype=``."""
    if dtype is None:
        return {}
    try:  # present exactly where diffusers maps the old name onto the new one
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
