"""Group-relative advantages of non-differentiable rewards (GRPO; docs/method.md §12).

A rollout batch holds G groups of K samples; the samples of a group share one condition. A sample's
advantage is its reward relative to the other members of its group::

    A_i = (r_i − mean_group(r)) / (std_group(r) + eps)

With several rewards there are two ways to combine them:

- ``"sum"`` — sum the (weighted) rewards, then normalise the sum per group (Flow-GRPO);
- ``"per_reward"`` — normalise each reward per group, then take the weighted sum of the normalised
  values (GDPO): a reward with a large raw range cannot drown the others.

A missing score (NaN: the scorer failed or returned NaN for that sample) drops the sample from its
group: it gets advantage 0 and ``valid = False``, and the group's statistics use the other members
only. A group with fewer than two valid members, or whose rewards are all equal, carries no
signal: its members get advantage 0 (they are still valid samples; a policy gradient of 0 is the
right update for them). Advantages are finally clipped to ``±clip``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["AdvantageMode", "ca_weights", "group_advantages"]

AdvantageMode = Literal["sum", "per_reward"]


def _normalise(r: Tensor, groups: Tensor, valid: Tensor, num_groups: int, eps: float) -> Tensor:
    """(B,) per-group standardised ``r`` over the valid members (0 elsewhere and for flat groups)."""
    v = valid.to(r.dtype)
    x = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, groups, v)
    total = torch.zeros_like(count).index_add_(0, groups, x)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, r - mean[groups], torch.zeros_like(r))
    # Population std (ddof 0): a two-member group gives ±1, as Flow-GRPO's per-prompt statistics.
    var = torch.zeros_like(count).index_add_(0, groups, dev * dev) / count.clamp(min=1)
    std = var.sqrt()
    informative = (count >= 2) & (std > 0)
    scale = torch.where(informative, 1.0 / (std + eps), torch.zeros_like(std))
    return dev * scale[groups]


def group_advantages(
    rewards: Tensor,
    groups: Tensor,
    *,
    weights: Sequence[float] | None = None,
    mode: AdvantageMode = "sum",
    eps: float = 1e-6,
    clip: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Per-sample group-relative advantages.

    Args:
        rewards: (B,) or (B, R) scores, higher is better; NaN marks a sample whose score is missing
            (for ``(B, R)``: a NaN in any of its R rewards drops the sample).
        groups: (B,) int64 group index of each sample, values in ``[0, G)``.
        weights: (R,) weight of each reward (default 1 each).
        mode: ``"sum"`` (sum, then normalise) or ``"per_reward"`` (normalise each, then sum).
        eps: added to a group's standard deviation.
        clip: advantages are clipped to ``[−clip, clip]`` (inf: no clipping).

    Returns:
        ``(advantages, valid)``: (B,) float32 advantages and (B,) bool, False for dropped samples.

    Raises:
        ValueError: on shape, dtype or value errors (named).
    """
    if not isinstance(rewards, Tensor) or not rewards.is_floating_point() or rewards.dim() not in (1, 2):
        raise ValueError(
            f"rewards must be a float (B,) or (B, R) tensor, got {getattr(rewards, 'shape', rewards)!r}"
        )
    r = rewards.float() if rewards.dim() == 2 else rewards.float()[:, None]
    B, R = r.shape
    if not isinstance(groups, Tensor) or groups.dtype != torch.int64 or groups.shape != (B,):
        raise ValueError(
            f"groups must be an int64 tensor of shape ({B},), got {getattr(groups, 'shape', groups)!r}"
        )
    if B and int(groups.min()) < 0:
        raise ValueError("groups must be >= 0")
    w = torch.ones(R) if weights is None else torch.tensor([float(x) for x in weights])
    if w.shape != (R,):
        raise ValueError(f"weights must have {R} entries (one per reward), got {len(w)}")
    if mode not in ("sum", "per_reward"):
        raise ValueError(f"mode must be 'sum' or 'per_reward', got {mode!r}")
    if not eps >= 0 or not clip > 0:
        raise ValueError(f"eps must be >= 0 and clip > 0, got eps={eps}, clip={clip}")
    w = w.to(r.device)
    valid = torch.isfinite(r).all(dim=1)
    G = int(groups.max()) + 1 if B else 0
    r = torch.where(valid[:, None], r, torch.zeros_like(r))
    if mode == "sum":
        adv = _normalise(r @ w, groups, valid, G, eps)
    else:
        adv = torch.zeros(B, dtype=torch.float32, device=r.device)
        for j in range(R):
            adv = adv + w[j] * _normalise(r[:, j], groups, valid, G, eps)
    return adv.clamp(-clip, clip), valid


def ca_weights(advantages: Tensor, valid: Tensor, *, scale: float = 1.0) -> Tensor:
    """Per-sample weights of Decoupled DMD's CA term from group advantages (docs/method.md §12).

    ``w = max(0, 1 + scale·A)``: a group's weights average to 1 before the floor (its advantages
    average to 0), so the CA term keeps its overall strength and leans toward the samples the
    reward prefers; the floor keeps every weight ≥ 0 (a negative weight would push a sample *away*
    from the CFG direction). A dropped sample (``valid`` False: no score) gets weight 1, plain
    Decoupled DMD. Extreme advantages are bounded by :func:`group_advantages`' ``clip``.

    Args:
        advantages: (B,) from :func:`group_advantages`.
        valid: (B,) bool from :func:`group_advantages`.
        scale: how strongly the advantage moves the weight (0: plain Decoupled DMD).

    Returns:
        (B,) float32 weights ≥ 0.
    """
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    w = (1.0 + scale * advantages.float()).clamp(min=0.0)
    return torch.where(valid, w, torch.ones_like(w))
