"""Ink coverage: the fraction of bright pixels, a reward with no useful gradient (docs/method.md §12).

Score = the fraction of pixels whose channel mean exceeds ``threshold`` — for white-on-black digits,
how much of the canvas the strokes cover. A threshold count has zero gradient almost everywhere,
so it can only be optimised by group-relative methods (``rl.algorithm``). Pushed alone it is
hacked at once (fill the canvas), which makes it a clear benchmark of the regulariser.
"""

from __future__ import annotations

from torch import Tensor

from dmdr_fast.rewards.base import Reward, RewardCondition
from dmdr_fast.rewards.spec import RewardSpec

__all__ = ["InkReward"]


class InkReward(Reward):
    """``mean(images.mean(channels) > threshold)`` per image (``(B, C, H, W)`` in ``[0, 1]``).

    Args:
        threshold: the brightness above which a pixel counts as ink, in ``(0, 1)``.
        spec: the reward's spec; ``None``: named ``ink``.
    """

    differentiable = False

    def __init__(self, threshold: float = 0.5, *, spec: RewardSpec | None = None) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        super().__init__(spec=spec if spec is not None else RewardSpec(name="ink"))
        self.threshold = float(threshold)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        return (images.detach().float().mean(1) > self.threshold).flatten(1).float().mean(1)
