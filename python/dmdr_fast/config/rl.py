"""Rewards without gradients: group-relative policy optimisation around DMD (docs/method.md §12)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dmdr_fast.config.base import ConfigBase
from dmdr_fast.config.engine import check_range

__all__ = ["RLConfig"]


@dataclass(frozen=True)
class RLConfig(ConfigBase):
    """How the rewards act when they are scored, not differentiated (``algorithm`` != 'none').

    From stage 2 on (``dmdr.cold_start_steps``) every batch holds ``batch_size / group_size``
    conditions, each sampled ``group_size`` times; every active reward of ``rewards`` is called as a
    black box (no gradient, in chunks, a failing or NaN sample dropped) and the scores become
    group-relative advantages.
    """

    algorithm: Literal["none", "advantage_weighted", "grpo"] = field(
        default="none",
        metadata={
            "help": "'none': rewards are differentiable and their gradient joins DMD (ReFL, the paper); "
            "'advantage_weighted': group advantages weight Decoupled DMD's CFG-augmentation term per "
            "sample, the DM term unweighted (needs dmdr.decoupled and guidance > 1); 'grpo': the clipped "
            "policy-gradient step of GRPO on the stochastic few-step sampler, with `regularizer` in place "
            "of Flow-GRPO's KL term."
        },
    )
    group_size: int = field(
        default=8,
        metadata={
            "help": "K samples per condition (a group); it must divide the world batch train.batch_size × "
            "world size, and a group may span ranks under torchrun (Flow-GRPO: 16–24 on SD3.5)."
        },
    )
    advantage: Literal["sum", "per_reward"] = field(
        default="sum",
        metadata={
            "help": "Several rewards: 'sum' = weighted sum, then normalise per group (Flow-GRPO); "
            "'per_reward' = normalise each per group, then weighted sum (GDPO). Weights: rewards.*.weight."
        },
    )
    advantage_clip: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to ±advantage_clip (Flow-GRPO: 5)."}
    )
    ca_scale: float = field(
        default=1.0,
        metadata={
            "help": "advantage_weighted: CA weight of a sample w = max(0, 1 + ca_scale·A); 0 = plain "
            "Decoupled DMD. With the clip, w <= 1 + ca_scale·advantage_clip."
        },
    )
    sde_noise: float = field(
        default=0.05,
        metadata={
            "help": "grpo: std of the Gaussian policy around the student's final prediction, in the model's "
            "space (pixels or latents); steps before the last use the sampler's own noise t_{k+1}."
        },
    )
    clip: float = field(
        default=0.2,
        metadata={"help": "grpo: PPO clip range ε of the probability ratio (Flow-GRPO: 1e-4 … 0.2)."},
    )
    passes: int = field(
        default=2,
        metadata={
            "help": "grpo: optimiser steps on each rollout batch (the first is on-policy, later ones are "
            "clipped); they count as one generator step."
        },
    )
    policy_weight: float = field(
        default=1.0, metadata={"help": "grpo: weight of the clipped policy-gradient loss."}
    )
    regularizer: Literal["dmd", "dm", "kl", "none"] = field(
        default="dmd",
        metadata={
            "help": "grpo: 'dmd' = the run's DMD loss (Decoupled: DM + CA); 'dm' = its distribution-matching "
            "term only (real score without CFG); 'kl' = KL of each transition to the initial student "
            "(Flow-GRPO's baseline; keeps a frozen copy); 'none' = unregularised (the reward-hacking "
            "baseline)."
        },
    )
    regularizer_weight: float = field(
        default=1.0,
        metadata={
            "help": "grpo: weight of the regulariser (the DMD loss's own weight is dmdr.dmd_weight × this; "
            "Flow-GRPO's KL β: 0.04)."
        },
    )
    score_chunk: int = field(
        default=64, metadata={"help": "Samples per call of a scorer (a slow scorer shows a progress bar)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "group_size", ge=1)
        check_range(self, "advantage_clip", gt=0)
        check_range(self, "ca_scale", ge=0)
        check_range(self, "sde_noise", gt=0)
        check_range(self, "clip", gt=0)
        check_range(self, "passes", ge=1)
        check_range(self, "policy_weight", ge=0)
        check_range(self, "regularizer_weight", ge=0)
        check_range(self, "score_chunk", ge=1)

    @property
    def enabled(self) -> bool:
        """True iff the rewards are scored as black boxes (a group-relative mode)."""
        return self.algorithm != "none"
