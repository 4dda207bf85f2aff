"""The rectified-flow convention (docs/method.md §1) as three one-line formulas, plus a network call.

``x_t = (1 − t)·x0 + t·ε`` with ``t = 1`` pure noise, velocity ``v ≈ ε − x0``, clean estimate
``x̂0 = x_t − t·v``. Times are per-sample vectors ``(B,)``; they broadcast over the other dims.

Arithmetic runs in the promoted dtype of the data and the times (float32 times keep their
precision next to bf16 data: 0.9 in bf16 is 0.8984), and results are returned in the data's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch

from dmdr_fast.algo._utils import check_like, check_tensor, check_times, randn, view_batch
from dmdr_fast.conditions import Cond

__all__ = ["VelocityFn", "noise_like", "predict_x0", "renoise", "velocity_target", "x0_from_velocity"]

VelocityFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""``velocity_fn(x, t, cond) -> v``: x (B, ...), t (B,) float in [0, 1] with t = 1 pure noise,
returns v (B, ...) ≈ ε − x0 (the rectified-flow convention, docs/method.md §1)."""


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian noise with the shape, dtype and device of ``x``.

    Unlike ``torch.randn_like`` it takes a generator; the numbers are drawn on the generator's
    device and moved to ``x``'s, so a CPU generator gives the same noise on every device.

    Args:
        x: (B, ...) reference tensor.
        generator: optional RNG.

    Returns:
        (B, ...) noise ε.
    """
    check_tensor("x", x)
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def renoise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise clean samples to time ``t``: ``x_t = (1 − t)·x0 + t·ε``.

    Gradients flow to ``x0`` if it requires them; callers detach it where the method says ``sg``.

    Args:
        x0: (B, ...) clean samples.
        t: (B,) times in [0, 1].
        noise: (B, ...) Gaussian noise ε, same shape as ``x0``.

    Returns:
        (B, ...) noised samples in ``x0``'s dtype.
    """
    check_tensor("x0", x0)
    check_times("t", t, x0.shape[0])
    check_like("noise", noise, "x0", x0)
    tb = view_batch(t, x0)
    return ((1 - tb) * x0 + tb * noise).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Clean estimate from a velocity: ``x̂0 = x_t − t·v``.

    Args:
        x_t: (B, ...) noisy samples.
        t: (B,) their times.
        v: (B, ...) predicted velocity.

    Returns:
        (B, ...) clean estimate in ``x_t``'s dtype.
    """
    check_tensor("x_t", x_t)
    check_times("t", t, x_t.shape[0])
    check_like("v", v, "x_t", x_t)
    return (x_t - view_batch(t, x_t) * v).to(x_t.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target ``ε − x0`` (the velocity of the straight path).

    Args:
        x0: (B, ...) clean samples.
        noise: (B, ...) the noise used to build ``x_t``.

    Returns:
        (B, ...) target velocity.
    """
    check_like("noise", noise, "x0", x0)
    return noise - x0


def predict_x0(velocity_fn: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Call a velocity network and return its clean estimate ``x_t − t·velocity_fn(x_t, t, cond)``.

    This is the generator's output ``x0 = x_in − t_k·G(x_in, t_k, c)`` (docs/method.md §5.3); the
    gradient mode is the caller's (no ``no_grad`` here).

    Args:
        velocity_fn: network ``(x, t, cond) -> v``.
        x_t: (B, ...) network input.
        t: (B,) times passed to the network.
        cond: condition for the batch.

    Returns:
        (B, ...) clean estimate in ``x_t``'s dtype.

    Raises:
        ValueError: if the network's output does not have the input's shape.
    """
    v = velocity_fn(x_t, t, cond)
    if not isinstance(v, torch.Tensor) or v.shape != x_t.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"velocity_fn must return a tensor of the input shape {tuple(x_t.shape)}, got {got}")
    return x0_from_velocity(x_t, t, v)
