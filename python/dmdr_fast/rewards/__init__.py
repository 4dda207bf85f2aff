"""Rewards behind one protocol: decoded images ``(B, C, H, W)`` in [0, 1] + condition → score ``(B,)``.

- :mod:`~dmdr_fast.rewards.base` — :class:`Reward` (the protocol and loss forms ``neg`` / ``hinge``,
  per-reward weight, the ``differentiable`` flag), :class:`CompositeReward` (weighted sum with
  per-reward logs) and the input checks.
- :mod:`~dmdr_fast.rewards.classifier` — :class:`ClassifierReward`: log p(label | image) of a frozen
  classifier (the class-conditional ReFL reward).
"""

from dmdr_fast.rewards.base import (
    LOSS_FORMS,
    CompositeReward,
    LossForm,
    Reward,
    RewardCondition,
    RewardOutput,
    check_condition,
    check_images,
    reward_loss,
)
from dmdr_fast.rewards.classifier import CLASSIFIER_MODES, ClassifierReward

__all__ = [
    "CLASSIFIER_MODES",
    "LOSS_FORMS",
    "ClassifierReward",
    "CompositeReward",
    "LossForm",
    "Reward",
    "RewardCondition",
    "RewardOutput",
    "check_condition",
    "check_images",
    "reward_loss",
]
