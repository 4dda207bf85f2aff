"""Pure-PyTorch references: the specification of every op in :mod:`dmdr_fast.ops`.

These functions are the source of truth. Fused backends (C++ CPU, CUDA, Triton) are tested
against them, the benchmarks use them as the eager baseline, and the ``torch`` backend calls
them directly. They favour clarity over speed and always accumulate in float32 (or float64
when every input is float64).
"""

from __future__ import annotations

import torch

__all__ = ["dmd_loss_ref", "real_velocity_ref"]


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
