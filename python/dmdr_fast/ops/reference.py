"""Pure-PyTorch references: the specification of every op in :mod:`dmdr_fast.ops`.

These functions are the source of truth. Fused backends (C++ CPU, CUDA, Triton) are tested
against them, the benchmarks use them as the eager baseline, and the ``torch`` backend calls
them directly. They favour clarity over speed and always accumulate in float32 (or float64
when every input is float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["RewardGradStats", "dmd_loss_ref", "real_velocity_ref", "reward_grad_combine_ref"]


def _accum_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if every given tensor is float64 (used by gradcheck), else float32."""
    present = [x for x in tensors if x is not None]
    return torch.float64 if all(x.dtype == torch.float64 for x in present) else torch.float32


def real_velocity_ref(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guided velocity ``v_uncond + w·(v_cond − v_uncond)`` (``v_cond`` if no uncond)."""
    if v_uncond is None:
        return v_cond
    return v_uncond + guidance * (v_cond - v_uncond)


def dmd_loss_ref(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v_fake: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    eps: float = 1e-8,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD score-difference loss (DESIGN §1, step 3), written out literally.

    With ``v_real = v_uncond + w·(v_cond − v_uncond)`` (or ``v_cond``)::

        x̂0_real = x_t − t·v_real          x̂0_fake = x_t − t·v_fake
        n_b     = mean_b |x0 − x̂0_real| + eps            (per sample b)
        g       = nan_to_num((x̂0_fake − x̂0_real) / n_b)
        loss    = ½·mean(g²)               ∂loss/∂x0 = g / numel(x0)

    The gradient treats ``g`` as a constant (the loss is ``½·MSE(x0, sg(x0 − g))``), so this
    function returns ``g`` detached and callers build the gradient from it. ``nan_to_num``
    maps NaN to 0 and ±Inf to the largest finite value of the accumulation dtype.

    Args:
        x0: (B, ...) generator output.
        x_t: (B, ...) renoised sample ``(1 − t)·sg(x0) + t·ε``.
        t: (B,) renoise times in [0, 1].
        v_fake: (B, ...) velocity of the fake score (critic).
        v_cond: (B, ...) conditional velocity of the real score (teacher).
        v_uncond: (B, ...) unconditional real velocity, or None for no CFG.
        guidance: CFG scale ``w``; ignored when ``v_uncond`` is None.
        eps: added to the per-sample normaliser.
        upcast: compute in float32 (float64 for all-float64 inputs). With ``upcast=False`` the
            arithmetic runs in the inputs' promoted dtype, which is how tests measure PyTorch's
            own low-precision error.

    Returns:
        ``(loss, g)``: loss a 0-dim tensor in the accumulation dtype; ``g`` with x0's shape, in
        the accumulation dtype (or the promoted input dtype if ``upcast=False``).
    """
    if upcast:
        dt = _accum_dtype(x0, x_t, v_fake, v_cond, v_uncond)
    else:
        dt = torch.promote_types(x0.dtype, x_t.dtype)
        for v in (v_fake, v_cond, v_uncond):
            if v is not None:
                dt = torch.promote_types(dt, v.dtype)
    x0_, xt_, vf_, vc_ = (a.to(dt) for a in (x0.detach(), x_t, v_fake, v_cond))
    vu_ = None if v_uncond is None else v_uncond.to(dt)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    t_ = t.to(dt).reshape(shape)

    v_real = real_velocity_ref(vc_, vu_, guidance)
    x0_real = xt_ - t_ * v_real
    x0_fake = xt_ - t_ * vf_
    dims = tuple(range(1, x0.dim()))
    norm = (x0_ - x0_real).abs().mean(dim=dims, keepdim=True) + eps
    g = torch.nan_to_num((x0_fake - x0_real) / norm)
    loss = 0.5 * g.square().mean()
    return loss, g


class RewardGradStats(NamedTuple):
    """Per-sample diagnostics of :func:`dmdr_fast.ops.reward_grad_combine`, each of shape (B,).

    Attributes:
        dmd_norm: ``‖g_dmd‖₂`` per sample.
        reward_norm: ``‖r‖₂`` per sample, ``r`` being ``g_reward`` with NaN/±Inf entries zeroed.
        cosine: cosine between ``g_dmd`` and ``r`` (0 when either norm is 0).
        weight: the weight ``w`` that multiplied ``r``.
        nonfinite: int64 count of NaN/±Inf entries of ``g_reward``.
    """

    dmd_norm: torch.Tensor
    reward_norm: torch.Tensor
    cosine: torch.Tensor
    weight: torch.Tensor
    nonfinite: torch.Tensor


def reward_grad_combine_ref(
    g_dmd: torch.Tensor,
    g_reward: torch.Tensor,
    mode: str = "fixed",
    weight: float = 1.0,
    ratio: float = 1.0,
    max_weight: float = math.inf,
    eps: float = 1e-12,
    upcast: bool = True,
) -> tuple[torch.Tensor, RewardGradStats]:
    """Combination of the DMD direction with the reward gradient, written out literally.

    Per sample ``i`` (every dimension after the first flattened)::

        r_i   = g_reward_i with NaN, +Inf and −Inf entries replaced by 0   (n_i = their number)
        a_i   = ‖g_dmd_i‖₂      b_i = ‖r_i‖₂      d_i = ⟨g_dmd_i, r_i⟩
        cos_i = d_i / (a_i·b_i) if a_i·b_i > 0 else 0
        w_i   = weight                                  (mode "fixed"; max_weight ignored)
              = min(max_weight, ratio·a_i / (b_i + eps))  (mode "balanced")
        g_i   = g_dmd_i + w_i·r_i

    ``g_dmd`` is not sanitised: it must be finite. Inputs are detached (they are gradients).

    Args:
        g_dmd: (B, ...) DMD direction.
        g_reward: (B, ...) reward gradient, same shape.
        mode: ``"fixed"`` or ``"balanced"``.
        weight: the weight of mode ``"fixed"``.
        ratio: target ratio ``‖w·r‖ / ‖g_dmd‖`` of mode ``"balanced"``.
        max_weight: cap on the balanced weight (``math.inf``: no cap).
        eps: added to ``‖r‖`` in the balanced weight.
        upcast: compute in float32 (float64 when the promoted input dtype is float64). With
            ``upcast=False`` the arithmetic runs in the promoted input dtype, which is how tests
            measure PyTorch's own low-precision error.

    Returns:
        ``(g, stats)``: ``g`` of g_dmd's shape in the computation dtype, and
        :class:`RewardGradStats` (the first four in the computation dtype, ``nonfinite`` int64).
    """
    dt = torch.promote_types(g_dmd.dtype, g_reward.dtype)
    if upcast:
        dt = torch.float64 if dt == torch.float64 else torch.float32
    B = g_dmd.shape[0]
    d = g_dmd.detach().to(dt).reshape(B, -1)
    r = g_reward.detach().to(dt).reshape(B, -1)

    finite = torch.isfinite(r)
    nonfinite = (~finite).sum(dim=1)
    r = torch.where(finite, r, 0.0)
    a = (d * d).sum(dim=1).sqrt()
    b = (r * r).sum(dim=1).sqrt()
    dot = (d * r).sum(dim=1)
    ab = a * b
    cosine = torch.where(ab > 0, dot / ab, 0.0)
    if mode == "fixed":
        w = torch.full_like(a, weight)
    elif mode == "balanced":
        w = (ratio * a / (b + eps)).clamp(max=max_weight)
    else:
        raise ValueError(f"reward_grad_combine_ref: `mode` must be 'fixed' or 'balanced', got {mode!r}")
    g = (d + w[:, None] * r).reshape(g_dmd.shape)
    return g, RewardGradStats(a, b, cosine, w, nonfinite)
