"""DMDR losses on tensors (docs/method.md §5.2–§5.4): the critic's flow-matching loss and the
generator's DMD loss, plus the Decoupled-DMD variant.

The generator loss is computed by the fused op :func:`dmdr_fast.ops.dmd_loss`; this module fixes
the algorithm-level conventions around it (what "no CFG" means, argument checks) so the trainer
never calls the op with an ambiguous combination. Both generator losses are surrogates: their
value is ``½·mean(g²)`` per term, and what matters is their gradient w.r.t. ``x0``, ``g / numel``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dmdr_fast.algo._utils import check_finite, check_like, check_tensor, check_times
from dmdr_fast.algo.flow import renoise
from dmdr_fast.algo.guidance import uses_cfg
from dmdr_fast.ops import dmd_loss

__all__ = [
    "DecoupledDMDLoss",
    "critic_loss",
    "decoupled_dmd_loss",
    "generator_dmd_loss",
    "renoise",
]


def critic_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score (critic), ``mean((v_pred − (ε − x̂0))²)``.

    The mean runs over every element (``F.mse_loss`` with ``reduction="mean"``), in float32 for
    low-precision inputs (float64 inputs stay float64). The target is treated as a constant: only
    ``v_pred`` (the critic's LoRA ψ) receives gradients.

    Args:
        v_pred: (B, ...) critic velocity ``H(x_τ, τ, c; λ_f)`` at ``x_τ = (1 − τ)·x̂0 + τ·ε``.
        x0: (B, ...) the backward simulation's ``x̂0_sel``.
        noise: (B, ...) the ε used to build ``x_τ``.

    Returns:
        0-dim float32 (or float64) loss.
    """
    check_tensor("v_pred", v_pred)
    check_like("x0", x0, "v_pred", v_pred)
    check_like("noise", noise, "v_pred", v_pred)
    acc = torch.promote_types(v_pred.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)
    target = noise.detach().to(acc) - x0.detach().to(acc)
    return (v_pred.to(acc) - target).square().mean()


def _check_dmd_inputs(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    velocities: dict[str, torch.Tensor | None],
    prefix: str = "",
) -> None:
    check_like(f"{prefix}x_t", x_t, "x0", x0)
    check_times(f"{prefix}t", t, x0.shape[0])
    for name, v in velocities.items():
        if v is not None:
            check_like(name, v, "x0", x0)


def generator_dmd_loss(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v_fake: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    *,
    eps: float = 1e-8,
    backend: str | None = None,
    return_direction: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generator DMD loss (docs/method.md §5.4) through the fused op.

    ``v_real = v_uncond + w·(v_cond − v_uncond)``, ``x̂0_real = x_t − t·v_real``,
    ``x̂0_fake = x_t − t·v_fake``, ``g = nan_to_num((x̂0_fake − x̂0_real) /
    (mean_sample|x0 − x̂0_real| + eps))``, loss ``½·mean(g²)`` with gradient ``g / numel(x0)``.

    No CFG when ``guidance <= 1``: ``v_real = v_cond`` and ``v_uncond`` is not used (it may be
    None); see :mod:`dmdr_fast.algo.guidance`.

    Args:
        x0: (B, ...) generator output ``x_in − t_k·G(x_in, t_k, c)``, with grad.
        x_t: (B, ...) ``(1 − τ')·sg(x0) + τ'·ε'``.
        t: (B,) renoise times τ'.
        v_fake: (B, ...) fake-score velocity at ``x_t`` (never guided).
        v_cond: (B, ...) conditional real-score velocity.
        v_uncond: (B, ...) unconditional real-score velocity, needed only when ``guidance > 1``.
        guidance: CFG scale w of this batch.
        eps: added to the per-sample normaliser.
        backend: op backend (None = automatic; see :mod:`dmdr_fast.ops`).
        return_direction: also return ``g``.

    Returns:
        0-dim float32 loss, or ``(loss, g)`` with g (B, ...) float32 and detached.
    """
    check_tensor("x0", x0)
    _check_dmd_inputs(x0, x_t, t, {"v_fake": v_fake, "v_cond": v_cond, "v_uncond": v_uncond})
    w = check_finite("guidance", guidance)
    eps = check_finite("eps", eps, minimum=0.0)
    if not uses_cfg(w):
        v_uncond = None  # no CFG: the op then uses v_cond as the real velocity
    elif v_uncond is None:
        raise ValueError(f"v_uncond is required when guidance > 1 (got guidance={w})")
    return dmd_loss(
        x0, x_t, t, v_fake, v_cond, v_uncond, w, eps, backend=backend, return_direction=return_direction
    )


class DecoupledDMDLoss(NamedTuple):
    """Result of :func:`decoupled_dmd_loss`.

    Attributes:
        loss: 0-dim, ``dm_weight·dm_loss + ca_weight·ca_loss``; back-propagate this one.
        dm_loss: 0-dim distribution-matching term ``½·mean(g_dm²)``.
        ca_loss: 0-dim CFG-augmentation term ``½·mean(g_ca²)`` (0 when ``guidance <= 1``).
        direction: (B, ...) ``dm_weight·g_dm + ca_weight·g_ca`` (= gradient·numel), or None
            unless requested.
    """

    loss: torch.Tensor
    dm_loss: torch.Tensor
    ca_loss: torch.Tensor
    direction: torch.Tensor | None


def decoupled_dmd_loss(
    x0: torch.Tensor,
    *,
    dm_x_t: torch.Tensor,
    dm_t: torch.Tensor,
    v_fake: torch.Tensor,
    dm_v_cond: torch.Tensor,
    ca_x_t: torch.Tensor,
    ca_t: torch.Tensor,
    ca_v_cond: torch.Tensor,
    ca_v_uncond: torch.Tensor | None,
    guidance: float,
    dm_weight: float = 1.0,
    ca_weight: float = 1.0,
    eps: float = 1e-8,
    backend: str | None = None,
    return_direction: bool = False,
    ca_sample_weight: torch.Tensor | None = None,
) -> DecoupledDMDLoss:
    """Decoupled DMD: the real-score term split into its two mechanisms, each at its own time.

    With CFG the DMD direction ``x̂0_fake − x̂0_real = τ·(v_real − v_fake)`` is the sum of a
    *distribution-matching* part ``τ·(v_cond − v_fake)`` and a *CFG-augmentation* part
    ``τ·(w − 1)·(v_cond − v_uncond)``. Here each part is evaluated at its own renoised sample
    (``dm_x_t`` at ``dm_t``, ``ca_x_t`` at ``ca_t``; the caller draws the two times from whatever
    schedules it likes) and normalised like a DMD2 term, by calling the fused op twice:

    * DM: ``dmd_loss(x0, dm_x_t, dm_t, v_fake, dm_v_cond)``; normaliser ``mean|x0 − x̂0_cond|``.
    * CA: ``dmd_loss(x0, ca_x_t, ca_t, ca_v_cond, ca_v_cond, ca_v_uncond, w)``: with the
      conditional velocity in the fake slot, ``v_real − v_fake = (w − 1)·(v_cond − v_uncond)``
      exactly; normaliser ``mean|x0 − x̂0_cfg|``.

    With equal times and noises the two numerators add up to the plain DMD numerator; only the
    normalisers differ. No CFG (``guidance <= 1``) leaves the DM term alone.

    Args:
        x0: (B, ...) generator output, with grad.
        dm_x_t: (B, ...) renoised ``sg(x0)`` for the DM term.
        dm_t: (B,) its times.
        v_fake: (B, ...) fake-score velocity at ``dm_x_t``.
        dm_v_cond: (B, ...) conditional real velocity at ``dm_x_t``.
        ca_x_t: (B, ...) renoised ``sg(x0)`` for the CA term.
        ca_t: (B,) its times.
        ca_v_cond: (B, ...) conditional real velocity at ``ca_x_t``.
        ca_v_uncond: (B, ...) unconditional real velocity at ``ca_x_t`` (None allowed if w <= 1).
        guidance: CFG scale w.
        dm_weight: weight of the DM term (>= 0).
        ca_weight: weight of the CA term (>= 0).
        eps: added to both normalisers.
        backend: op backend.
        return_direction: also return the combined direction.
        ca_sample_weight: optional (B,) non-negative weight of each sample's CA term
            (advantage-weighted Decoupled DMD, docs/method.md §12): the gradient becomes
            ``dm_weight·g_dm + ca_weight·w_b·g_ca`` per sample, and ``ca_loss`` reports
            ``½·mean(w_b·g_ca²)``. The DM term is never weighted.

    Returns:
        :class:`DecoupledDMDLoss`.
    """
    check_tensor("x0", x0)
    _check_dmd_inputs(x0, dm_x_t, dm_t, {"v_fake": v_fake, "dm_v_cond": dm_v_cond}, prefix="dm_")
    _check_dmd_inputs(x0, ca_x_t, ca_t, {"ca_v_cond": ca_v_cond, "ca_v_uncond": ca_v_uncond}, prefix="ca_")
    w = check_finite("guidance", guidance)
    dm_weight = check_finite("dm_weight", dm_weight, minimum=0.0)
    ca_weight = check_finite("ca_weight", ca_weight, minimum=0.0)
    eps = check_finite("eps", eps, minimum=0.0)
    if uses_cfg(w) and ca_v_uncond is None:
        raise ValueError(f"ca_v_uncond is required when guidance > 1 (got guidance={w})")
    if ca_sample_weight is not None:
        cw = ca_sample_weight
        if not isinstance(cw, torch.Tensor) or cw.shape != (x0.shape[0],) or not cw.is_floating_point():
            raise ValueError(f"ca_sample_weight must be a float ({x0.shape[0]},) tensor")
        if not (torch.isfinite(cw).all() and (cw >= 0).all()):
            raise ValueError("ca_sample_weight must be finite and >= 0")

    def term(
        x_t: torch.Tensor,
        t: torch.Tensor,
        v_fake: torch.Tensor,
        v_cond: torch.Tensor,
        v_uncond: torch.Tensor | None,
        guidance: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Ask the op for g only when the caller wants it: a fused backend may then skip writing it.
        out = dmd_loss(
            x0,
            x_t,
            t,
            v_fake,
            v_cond,
            v_uncond,
            guidance,
            eps,
            backend=backend,
            return_direction=return_direction,
        )
        return out if isinstance(out, tuple) else (out, None)  # a tuple exactly when return_direction

    dm_loss, g_dm = term(dm_x_t, dm_t, v_fake, dm_v_cond, None, 1.0)
    loss = dm_weight * dm_loss
    direction = dm_weight * g_dm if g_dm is not None else None
    if uses_cfg(w) and ca_sample_weight is not None:
        # The op's loss is ½·mean(g²) with ∂/∂x0 = g/numel; a per-sample weight needs g itself:
        # a surrogate with value ½·mean(w·g²) and gradient w·g/numel.
        _, g_ca = dmd_loss(x0, ca_x_t, ca_t, ca_v_cond, ca_v_cond, ca_v_uncond, w, eps, backend=backend,
                           return_direction=True)  # fmt: skip
        wg = (ca_sample_weight.view(-1, *[1] * (x0.dim() - 1)).to(g_ca.dtype) * g_ca).detach()
        ca_loss = 0.5 * (wg * g_ca.detach()).float().mean()
        surrogate = (x0 * wg).sum() / x0.numel()
        loss = loss + ca_weight * (ca_loss + surrogate - surrogate.detach())
        if direction is not None:
            direction = direction + ca_weight * wg
    elif uses_cfg(w):
        ca_loss, g_ca = term(ca_x_t, ca_t, ca_v_cond, ca_v_cond, ca_v_uncond, w)
        loss = loss + ca_weight * ca_loss
        if direction is not None and g_ca is not None:
            direction = direction + ca_weight * g_ca
    else:
        ca_loss = torch.zeros((), dtype=dm_loss.dtype, device=dm_loss.device)
    return DecoupledDMDLoss(loss=loss, dm_loss=dm_loss, ca_loss=ca_loss, direction=direction)
