"""GRPO's clipped policy-gradient loss and the KL baseline regulariser (docs/method.md §12).

For each transition k of sample b the probability ratio of the current policy to the one that
sampled the rollout is taken per dimension, as Flow-GRPO does (its log-probabilities are means over
the pixels/latents)::

    ρ_kb = exp((log π_θ(a_kb | s_kb) − log π_old(a_kb | s_kb)) / D)

(D = the number of elements of one sample), and the loss is PPO's pessimistic clipped objective
with the sample's group advantage A_b, averaged over the valid samples and all N transitions::

    L = mean_{k, b valid} max(−A_b·ρ_kb, −A_b·clip(ρ_kb, 1 − ε, 1 + ε))

On-policy (the first pass over a rollout) ρ = 1 and ∇L = −mean A_b·∇ log π / D: the plain policy
gradient. The per-dimension ratio keeps ε meaningful whatever the resolution; a summed
log-probability over 10⁵ latent elements would make every ratio 0 or ∞ after one step.

The KL baseline (Flow-GRPO's regulariser, which DMD replaces here) between the transition
Gaussians of the current and the reference policy, which share their standard deviation σ_k, is
``‖μ_θ − μ_ref‖² / (2σ_k²)``, also averaged per dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["clipped_policy_loss", "transition_kl"]


def clipped_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    valid: Tensor,
    *,
    clip: float,
    dims: int,
) -> tuple[Tensor, dict[str, float]]:
    """PPO/GRPO's clipped surrogate loss.

    Args:
        logp: (N, B) log-probabilities of the rollout's actions under the current policy (grad).
        logp_old: (N, B) the same at sampling time (no grad).
        advantages: (B,) group advantages.
        valid: (B,) bool; False samples (no score) do not count.
        clip: ε of the ratio clip (> 0).
        dims: D, elements per sample (the per-dimension ratio).

    Returns:
        ``(loss, metrics)``: a 0-dim loss (0 with a graph when no sample is valid) and
        ``ratio`` (mean ρ), ``clip_frac`` (fraction of clipped terms) and ``approx_kl``
        (mean ½·(log ρ)², the usual estimate) over the valid terms.
    """
    if logp.shape != logp_old.shape or logp.dim() != 2 or logp.shape[1] != advantages.shape[0]:
        raise ValueError(
            f"logp {tuple(logp.shape)} and logp_old {tuple(logp_old.shape)} must be (N, B) with "
            f"B = {advantages.shape[0]} advantages"
        )
    if not clip > 0 or dims < 1:
        raise ValueError(f"clip must be > 0 and dims >= 1, got clip={clip}, dims={dims}")
    log_ratio = (logp - logp_old.detach()) / dims
    ratio = log_ratio.exp()
    a = advantages.detach().to(ratio)[None]
    terms = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    mask = valid.to(ratio)[None].expand_as(ratio)
    count = mask.sum()
    loss = (terms * mask).sum() / count.clamp(min=1)
    with torch.no_grad():
        denom = float(count.clamp(min=1))
        clipped = ((ratio - 1).abs() > clip).to(ratio) * mask
        metrics = {
            "ratio": float((ratio * mask).sum()) / denom,
            "clip_frac": float(clipped.sum()) / denom,
            "approx_kl": float((0.5 * log_ratio.pow(2) * mask).sum()) / denom,
        }
    return loss, metrics


def transition_kl(means: Tensor, ref_means: Tensor, stds: Sequence[float]) -> Tensor:
    """(B,) KL(π_θ ‖ π_ref) of each sample's transitions, per dimension, averaged over the N steps.

    Args:
        means: (N, B, ...) the current policy's action means (grad).
        ref_means: (N, B, ...) the reference policy's (no grad).
        stds: the N shared standard deviations σ_k.
    """
    if means.shape != ref_means.shape or means.shape[0] != len(stds):
        raise ValueError(
            f"means {tuple(means.shape)} / ref_means {tuple(ref_means.shape)} / {len(stds)} stds"
        )
    s = torch.tensor([float(x) for x in stds], dtype=torch.float32, device=means.device)
    sq = (means.float() - ref_means.detach().float()).pow(2).flatten(2).mean(2)  # (N, B)
    return (sq / (2 * s[:, None] ** 2)).mean(0)
