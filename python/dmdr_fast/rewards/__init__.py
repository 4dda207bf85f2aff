"""Rewards behind one protocol: decoded images ``(B, C, H, W)`` in [0, 1] + condition → score ``(B,)``.

- :mod:`~dmdr_fast.rewards.spec` — :class:`RewardSpec`: what defines a reward's loss (name, weight,
  loss form ``neg`` / ``hinge``, margin, prompt prefix), taken whole by every reward; how a new
  shared option is added.
- :mod:`~dmdr_fast.rewards.base` — :class:`Reward` (the protocol: scores, the loss its spec
  defines, the ``differentiable`` flag), :class:`CompositeReward` (weighted sum with per-reward
  logs) and the input checks.
- :mod:`~dmdr_fast.rewards.classifier` — :class:`ClassifierReward`: log p(label | image) of a frozen
  classifier (the class-conditional ReFL reward).
- :mod:`~dmdr_fast.rewards.clip` — :class:`CLIPScoreReward` (cosine of CLIP image and prompt
  embeddings; paper: hinge ``relu(0.7 − cos)``) and :class:`PickScoreReward` (PickScore,
  ``logit_scale.exp() · cos``); differentiable, text embeddings cached per prompt.
- :mod:`~dmdr_fast.rewards.aesthetic` — :class:`AestheticReward`: the LAION improved aesthetic
  predictor (:class:`AestheticMLP`) on CLIP ViT-L/14 image embeddings.
- :mod:`~dmdr_fast.rewards.hps` — :class:`HPSReward`: HPSv2 / HPSv2.1 (open_clip ViT-H-14
  checkpoints converted to transformers' ``CLIPModel``; paper: prompt prefix "Realistic photo ").
- :mod:`~dmdr_fast.rewards.image_reward` — :class:`ImageReward`: ImageReward (BLIP + MLP head,
  upstream ``ImageReward.pt`` converted to transformers' BLIP modules).
- :mod:`~dmdr_fast.rewards.jpeg` / :mod:`~dmdr_fast.rewards.ink` — :class:`JpegReward` (DDPO's
  JPEG (in)compressibility) and :class:`InkReward` (ink coverage): scores without gradients, for
  the group-relative modes (``rl.algorithm``); :mod:`~dmdr_fast.rewards.scoring` —
  :func:`score_robustly`, scoring in chunks where a failing or NaN sample is dropped, not fatal.
- :mod:`~dmdr_fast.rewards.callable` — :class:`CallableReward`: any ``fn(images, cond) -> (B,)``.
- :mod:`~dmdr_fast.rewards.registry` — :func:`build_reward` by kind name (:data:`REWARD_KINDS`),
  :func:`register_reward_kind` to add kinds, :func:`rewards_from_config` for a config's
  ``rewards`` list.
- :mod:`~dmdr_fast.rewards.preprocess` / :mod:`~dmdr_fast.rewards.loading` — differentiable CLIP
  preprocessing on tensors; finding weights locally (:class:`MissingWeightsError`).

The model-based rewards need ``transformers`` (``pip install 'dmdr-fast[rewards]'``); it is imported
only when such a reward is loaded, never by ``import dmdr_fast.rewards``.
"""

from dmdr_fast.rewards.aesthetic import (
    AESTHETIC_MLP_FILENAME,
    AESTHETIC_MLP_URL,
    AestheticMLP,
    AestheticReward,
)
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
from dmdr_fast.rewards.callable import CallableReward
from dmdr_fast.rewards.classifier import CLASSIFIER_MODES, ClassifierReward
from dmdr_fast.rewards.clip import (
    CLIP_HUB_ID,
    PICKSCORE_HUB_ID,
    PICKSCORE_PROCESSOR_HUB_ID,
    CLIPScoreReward,
    PickScoreReward,
)
from dmdr_fast.rewards.hps import HPSReward
from dmdr_fast.rewards.image_reward import ImageReward
from dmdr_fast.rewards.ink import InkReward
from dmdr_fast.rewards.jpeg import JpegReward
from dmdr_fast.rewards.loading import MissingWeightsError
from dmdr_fast.rewards.registry import (
    REWARD_KINDS,
    available_reward_kinds,
    build_reward,
    register_reward_kind,
    reward_from_config,
    rewards_from_config,
)
from dmdr_fast.rewards.scoring import ScoreReport, score_robustly
from dmdr_fast.rewards.spec import RewardSpec

__all__ = [
    "AESTHETIC_MLP_FILENAME",
    "AESTHETIC_MLP_URL",
    "CLASSIFIER_MODES",
    "CLIP_HUB_ID",
    "LOSS_FORMS",
    "PICKSCORE_HUB_ID",
    "PICKSCORE_PROCESSOR_HUB_ID",
    "REWARD_KINDS",
    "AestheticMLP",
    "AestheticReward",
    "CLIPScoreReward",
    "CallableReward",
    "ClassifierReward",
    "CompositeReward",
    "HPSReward",
    "ImageReward",
    "InkReward",
    "JpegReward",
    "LossForm",
    "MissingWeightsError",
    "PickScoreReward",
    "Reward",
    "RewardCondition",
    "RewardOutput",
    "RewardSpec",
    "ScoreReport",
    "available_reward_kinds",
    "build_reward",
    "check_condition",
    "check_images",
    "register_reward_kind",
    "reward_from_config",
    "reward_loss",
    "rewards_from_config",
    "score_robustly",
]
