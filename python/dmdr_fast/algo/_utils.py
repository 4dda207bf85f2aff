"""Private helpers shared by :mod:`dmdr_fast.algo`: argument checks and seeded random draws.

Random draws follow one rule everywhere in ``algo``: when a ``torch.Generator`` is given, numbers
are drawn on the generator's device and then moved to the target device. A CPU generator therefore
gives the same numbers whatever device the tensors live on (pass a generator on the tensors' device
to avoid the host-to-device copy of large noise tensors). Without a generator, the global RNG of the
target device is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dmdr_fast._device import host_to_device

__all__ = [
    "check_finite",
    "check_int",
    "check_like",
    "check_tensor",
    "check_times",
    "draw_device",
    "host_to_device",
    "rand",
    "randint",
    "randn",
    "view_batch",
]


# --------------------------------------------------------------------------------------------------
# Argument checks. Every message names the argument, the expected value and what was received.
# --------------------------------------------------------------------------------------------------


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int, or raise if it is not an integer (bool excluded) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_finite(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    strict: bool = False,
) -> float:
    """Return ``value`` as a float, or raise if it is not a finite real number in range.

    Args:
        name: argument name used in the error message.
        value: the value to check (int or float; bool is rejected).
        minimum: lower bound, or None for no bound.
        strict: if True the bound is exclusive (``value > minimum``).

    Returns:
        ``float(value)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if not strict and not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_tensor(name: str, x: object, *, min_dim: int = 1) -> torch.Tensor:
    """Raise unless ``x`` is a floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_like(name: str, x: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Raise unless ``x`` is a floating tensor with exactly the shape of ``ref``."""
    check_tensor(name, x)
    assert isinstance(x, torch.Tensor)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    return x


def check_times(name: str, t: object, batch_size: int) -> torch.Tensor:
    """Raise unless ``t`` is a floating tensor of shape ``(batch_size,)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch_size},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},) (a time per sample), got {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------------------------------
# Broadcasting and seeded draws.
# --------------------------------------------------------------------------------------------------


def view_batch(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``like``."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """Device on which random numbers are drawn: the generator's, else the target device."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def randn(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws of ``shape`` on the generator's device, returned on ``device``."""
    out = torch.randn(tuple(shape), generator=generator, device=draw_device(generator, device), dtype=dtype)
    return host_to_device(out, device)


def rand(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` on the generator's device, returned on ``device``."""
    out = torch.rand(tuple(shape), generator=generator, device=draw_device(generator, device), dtype=dtype)
    return host_to_device(out, device)


def randint(
    high: int,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform integers in ``[0, high)`` (int64) of ``shape``, returned on ``device``."""
    out = torch.randint(0, high, tuple(shape), generator=generator, device=draw_device(generator, device))
    return host_to_device(out, device)
