"""Input validation and small launcher helpers shared by every op.

Validation happens once, in Python, before any backend runs: the compiled kernels trust their
inputs (they receive raw pointers), so every check that protects them lives here. Messages name
the argument, what was expected and what was received.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FUSED_DTYPES",
    "check_float_tensor",
    "check_same_device",
    "check_same_shape",
    "cuda_capability_check",
    "dtype_code",
    "promote",
]

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
# Fused kernels compute in float32 and store in these; float64 is served by the reference.
FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def check_float_tensor(op: str, name: str, x: object) -> torch.Tensor:
    """Raise unless ``x`` is a real floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point() or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must be float32, float16, bfloat16 or float64, got {x.dtype} "
            "(integer and complex tensors are not accepted)"
        )
    return x


def check_same_shape(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise unless every tensor in ``others`` has ``ref``'s shape."""
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{op}: `{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, got {tuple(x.shape)}"
            )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Raise unless all given tensors live on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on the same device, got {listing}")
    return next(iter(present.values())).device


def promote(tensors: Sequence[torch.Tensor | None]) -> torch.dtype:
    """Common dtype of the non-None tensors (torch's promotion rules)."""
    dt = None
    for x in tensors:
        if x is not None:
            dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    assert dt is not None
    return dt


def dtype_code(dtype: torch.dtype) -> int:
    """The integer code ``dmdr_fast._C`` uses for ``dtype`` (see csrc/include/dmdr_fast/dtype.h)."""
    return _DTYPE_CODES[dtype]


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability_check(min_major: int, min_minor: int = 0):
    """An input check refusing CUDA devices below compute capability ``min_major.min_minor``."""

    def check(*, device: torch.device, **_: object) -> list[str]:
        if device.type != "cuda":
            return []
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if cap < (min_major, min_minor):
            return [f"needs compute capability >= {min_major}.{min_minor}, device has {cap[0]}.{cap[1]}"]
        return []

    return check
