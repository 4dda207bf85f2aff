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

__all__ = [
    "RewardGradStats",
    "attention_bwd_ref",
    "attention_ref",
    "dmd_loss_ref",
    "fp8_linear_ref",
    "quantize_fp8_ref",
    "real_velocity_ref",
    "reward_grad_combine_ref",
]


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
    """DMD score-difference loss (docs/method.md §5.4), written out literally.

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


def _attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    dt: torch.dtype,
) -> torch.Tensor:
    """P = softmax(q·kᵀ·scale + mask) in ``dt``; rows with every key masked are all zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    # Subtract the (detached) row max: softmax is shift-invariant, and a row of -inf gets a
    # shift of 0, so exp() gives exact zeros and the division below 0/1 instead of NaN.
    m = s.detach().amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, 1.0)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Non-causal scaled dot-product attention, written out literally (differentiable in q, k, v).

    ::

        S = q·kᵀ·scale          (B, H, Lq, Lk);  scale defaults to 1/sqrt(D)
        S[b, :, :, j] = −inf    where key_padding_mask[b, j] is True (that key is padding)
        P = softmax(S, dim=−1)  (a row whose keys are all padding: P = 0, so its output is 0)
        out = P·v               (B, H, Lq, D)

    Materialises the full (B, H, Lq, Lk) score matrix: the specification, not a fast path.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, D) values.
        key_padding_mask: optional bool (B, Lk), True = padding (ignored key), as in
            ``torch.nn.MultiheadAttention``.
        scale: softmax scale, default ``1/sqrt(D)``.
        upcast: compute in float32 (float64 for float64 inputs) and cast the output back to
            q's dtype; with ``upcast=False`` everything runs in q's dtype, which is how tests
            measure PyTorch's own low-precision error.

    Returns:
        (B, H, Lq, D) in q's dtype.
    """
    dt = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    p = _attention_probs(q, k, key_padding_mask, scale, dt)
    return (p @ v.to(dt)).to(q.dtype)


def attention_bwd_ref(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`attention_ref` (float32, float64 for float64 inputs).

    With P and out as in :func:`attention_ref`, dO = ``grad_out`` and δ = rowsum(dO ∘ out)::

        dV = Pᵀ·dO       dP = dO·vᵀ       dS = P ∘ (dP − δ)
        dQ = dS·k·scale  dK = dSᵀ·q·scale

    Masked keys and fully padded rows have P = 0, hence zero gradients. This is the math the
    flash backward kernels implement blockwise (recomputing P from q, k and the log-sum-exp).

    Returns:
        ``(dq, dk, dv)`` in the dtypes of q, k and v.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = _attention_probs(q, k, key_padding_mask, scale, dt)
    do, q_, k_, v_ = (x.to(dt) for x in (grad_out, q, k, v))
    out = p @ v_
    delta = (do * out).sum(dim=-1, keepdim=True)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v_.transpose(-1, -2) - delta)
    dq = (ds @ k_) * scale
    dk = (ds.transpose(-1, -2) @ q_) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def quantize_fp8_ref(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    eps: float = 1e-12,
    amax_ub: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (per-token) dynamic FP8 quantisation, written out literally.

    Per row r of the last dimension, in float32 (inputs are rounded to float32 first)::

        amax_r  = max_k |x[r, k]| over the finite entries (NaN and ±Inf count as 0)
        scale_r = max(min(amax_r, amax_ub), eps) / fp8_max        fp8_max = 448 (e4m3fn), 57344 (e5m2)
        q[r, k] = fp8(clamp(x[r, k] · (1 / scale_r), −fp8_max, fp8_max))   round to nearest even

    so ``x ≈ q.float() · scale`` (the dequantisation scale, as ``torch._scaled_mm`` takes it).
    Non-finite input is defined: NaN stays NaN in q (both formats have NaN), ±Inf saturates to
    ±fp8_max, and neither changes the row's scale; an all-zero row gets ``scale = eps / fp8_max``
    and q = 0. ``1 / scale_r`` is one IEEE division per row and the scaled value a single multiply,
    so every backend computes the same float32 value and the cast the same code.

    Args:
        x: (..., K) floating tensor, K >= 1.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        eps: floor of the row amax (> 0), so that a zero row has a finite, non-zero scale.
        amax_ub: cap of the row amax (``math.inf``: none); entries beyond it saturate.

    Returns:
        ``(q, scale)``: q (..., K) in ``fp8_dtype``; scale (..., 1) float32.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    xf = x.detach().float()
    a = xf.abs()
    amax = torch.where(torch.isfinite(a), a, 0.0).amax(dim=-1, keepdim=True)
    amax = amax.clamp(max=amax_ub).clamp(min=eps)
    # Divide by a tensor, not a Python number: for a scalar divisor CUDA multiplies by its
    # (inexact) reciprocal, which would differ from the kernels' division in the last bit.
    scale = amax / torch.full_like(amax, fp8_max)
    inv = torch.reciprocal(scale)
    q = (xf * inv).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return q, scale


def fp8_linear_ref(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The FP8 linear of :mod:`dmdr_fast.models.fp8`, written out in float64.

    ``x`` is quantised row-wise to e4m3 (:func:`quantize_fp8_ref`), both operands are dequantised
    exactly (an e4m3 value times a float32 scale is exact in float64) and multiplied in float64::

        y = (q_x · s_x) @ (W_q · s_w)ᵀ + b

    so the only difference to a float32 ``torch._scaled_mm`` is its accumulation rounding.

    Args:
        x: (..., K) input.
        weight_fp8: (N, K) e4m3 weight.
        weight_scale: (N, 1) float32 per-output-channel scale.
        bias: optional (N,) bias.

    Returns:
        (..., N) float64.
    """
    q, s = quantize_fp8_ref(x.reshape(-1, x.shape[-1]), torch.float8_e4m3fn)
    xd = q.double() * s.double()
    wd = weight_fp8.double() * weight_scale.double()
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight_fp8.shape[0])
