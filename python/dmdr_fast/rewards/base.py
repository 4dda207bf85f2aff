"""The reward protocol: decoded images + condition → per-sample score, and the loss forms around it.

A *reward* maps decoded images ``(B, C, H, W)`` in ``[0, 1]`` (what
:meth:`FlowModelAdapter.decode` returns) plus the batch's condition — int64 class labels ``(B,)``
or a sequence of B prompt strings — to a score ``(B,)``, higher is better. A *differentiable*
reward lets gradients flow from the score back to the images (ReFL, docs/method.md §7: from stage 2
the generator loss gains ``λ_R·ℓ_R(decode(x0), c)``); its own parameters are frozen.

What the loss of a reward is — its name, weight, loss form and margin, prompt prefix — is its
:class:`~dmdr_fast.rewards.spec.RewardSpec`, which every reward takes whole (``spec=``); see
:mod:`dmdr_fast.rewards.spec`, also for how a new shared option is added. The loss forms:

* ``loss_form="neg"``:   ``ℓ = weight · (−score)``
* ``loss_form="hinge"``: ``ℓ = weight · relu(margin − score)`` — the paper's text-to-image form
  (``relu(0.7 − score)`` for CLIP/HPS): no push once a sample is good enough, which limits hacking.

How a reward's gradient joins the DMD gradient (``combine``, ``ratio``, ``max_weight``) is not part
of the reward: it is configuration, read by the Trainer (docs/method.md §7).

:class:`CompositeReward` sums several such terms into one per-sample loss and reports the mean
score and loss of each for logging.

Non-differentiable rewards (OCR, detectors, VLM judges, JPEG size) subclass :class:`Reward`
with ``differentiable = False``. They are scored (under ``no_grad``) and logged by
:class:`CompositeReward` but never enter its differentiable loss; the group-relative modes
(``rl.algorithm``, :mod:`dmdr_fast.train.rl`) call every reward as a black box instead and turn
the scores into group advantages (docs/method.md §12).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from dmdr_fast.rewards.spec import LOSS_FORMS, LossForm, RewardSpec

__all__ = [
    "LOSS_FORMS",
    "CompositeReward",
    "LossForm",
    "Reward",
    "RewardCondition",
    "RewardOutput",
    "RewardSpec",
    "check_condition",
    "check_images",
    "reward_loss",
]

#: A batch of reward conditions: int64 class labels ``(B,)``, a sequence of B prompt strings, or
#: ``None`` for unconditional rewards.
RewardCondition = Tensor | Sequence[str] | None

# Decoded images are clamped to [0, 1]; allow rounding noise from decoders that are not.
_RANGE_TOL = 1e-4


def check_images(images: Any, *, channels: int | None = None, check_range: bool = True) -> int:
    """Validate a batch of decoded images; returns the batch size B.

    Args:
        images: Expected ``(B, C, H, W)`` floating point with values in ``[0, 1]``.
        channels: Required C, if the reward needs one.
        check_range: Check the value range (one host sync).

    Raises:
        ValueError: Naming ``images``, the expectation and what was given.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor in [0, 1], got {got}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"images must have {channels} channels (B, {channels}, H, W), got {tuple(images.shape)}"
        )
    if check_range and images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if not (lo >= -_RANGE_TOL and hi <= 1.0 + _RANGE_TOL):  # also catches NaN
            raise ValueError(
                f"images must be decoded images in [0, 1] (use adapter.decode), got values in [{lo:.4g}, {hi:.4g}]"
            )
    return int(images.shape[0])


def check_condition(cond: Any, batch: int, *, kind: Literal["labels", "prompts", "any"] = "any") -> None:
    """Validate that a reward condition matches the image batch.

    Args:
        cond: Class labels ``(B,)`` (integer tensor), a sequence of B strings, or ``None``.
        batch: B, the number of images.
        kind: ``"labels"`` or ``"prompts"`` to require that kind, ``"any"`` to accept both.

    Raises:
        ValueError: Naming ``cond`` and the mismatch (count, dtype, kind).
    """
    if isinstance(cond, Tensor):
        if kind == "prompts":
            raise ValueError(f"cond must be a sequence of {batch} prompt strings, got a tensor")
        if cond.dim() != 1 or cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
            raise ValueError(
                f"cond must be integer class labels of shape ({batch},), got {cond.dtype} {tuple(cond.shape)}"
            )
        if cond.shape[0] != batch:
            raise ValueError(f"cond has {cond.shape[0]} labels but images has {batch} samples")
        return
    if isinstance(cond, Sequence) and not isinstance(cond, (str, bytes)):
        if kind == "labels":
            raise ValueError(
                f"cond must be an int64 label tensor of shape ({batch},), got {type(cond).__name__}"
            )
        if not all(isinstance(p, str) for p in cond):
            raise ValueError("cond must be a sequence of prompt strings")
        if len(cond) != batch:
            raise ValueError(f"cond has {len(cond)} prompts but images has {batch} samples")
        return
    if cond is None and kind == "any":
        return
    raise ValueError(f"cond must be class labels (B,) or a sequence of B prompts, got {type(cond).__name__}")


def reward_loss(score: Tensor, form: LossForm = "neg", margin: float = 0.0, weight: float = 1.0) -> Tensor:
    """Per-sample loss of a score: ``weight·(−score)`` or ``weight·relu(margin − score)``.

    Args:
        score: ``(B,)`` scores, higher is better.
        form: ``"neg"`` or ``"hinge"``.
        margin: Hinge margin (ignored by ``"neg"``).
        weight: Multiplier.

    Returns:
        ``(B,)`` losses, differentiable in ``score``.
    """
    if form == "neg":
        loss = -score
    elif form == "hinge":
        loss = torch.relu(margin - score)
    else:
        raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {form!r}")
    return weight * loss


class Reward(nn.Module, ABC):
    """Base class of all rewards.

    Subclasses implement :meth:`score` (and set the class attribute ``differentiable``); the base
    class validates inputs in :meth:`forward` and turns scores into losses as its
    :class:`~dmdr_fast.rewards.spec.RewardSpec` says. A reward is an ``nn.Module`` so that
    ``.to(device)`` moves its model, but its parameters are frozen and it stays in eval mode:
    :meth:`train` is a no-op, so a Trainer calling ``.train()`` on a parent module never enables
    dropout in a reward model.

    Args:
        spec: What defines this reward's loss (name, weight, loss form, margin, prompt prefix);
            ``None`` gives ``RewardSpec(name=default_name)`` where the class has a
            :attr:`default_name`, and is an error where it has none.
        check_inputs: Validate images (shape, range: one host sync) and condition on every call.

    Attributes:
        spec: The :class:`~dmdr_fast.rewards.spec.RewardSpec` (frozen).

    Raises:
        TypeError: ``spec`` is not a ``RewardSpec``, or is missing where there is no default name.
    """

    #: Whether gradients flow from the score to the images. Non-differentiable rewards are only
    #: scored (group-relative branch); they never enter a differentiable loss.
    differentiable: bool = True
    #: The name of a reward built without ``spec`` (``None``: a spec is required).
    default_name: str | None = None

    def __init__(self, *, spec: RewardSpec | None = None, check_inputs: bool = True) -> None:
        super().__init__()
        if spec is None:
            if self.default_name is None:
                raise TypeError(f"{type(self).__name__} needs spec=RewardSpec(name=...)")
            spec = RewardSpec(name=self.default_name)
        if not isinstance(spec, RewardSpec):
            raise TypeError(f"spec must be a RewardSpec, got {type(spec).__name__}")
        self.spec = spec
        self.check_inputs = check_inputs
        super().train(False)

    @property
    def name(self) -> str:
        """``spec.name``: the key in logs and in ``config.rewards``."""
        return self.spec.name

    def train(self, mode: bool = True) -> Reward:
        """Rewards are frozen: stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    @abstractmethod
    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """Per-sample score, higher is better.

        Args:
            images: Decoded images ``(B, C, H, W)`` in ``[0, 1]``, already validated.
            cond: The batch's condition, already validated.

        Returns:
            ``(B,)`` scores (float), differentiable in ``images`` if ``differentiable``.
        """

    def prompts(self, cond: RewardCondition) -> list[str]:
        """The prompts this reward scores: ``prompt_prefix + p`` for each prompt of ``cond``.

        Raises:
            ValueError: If ``cond`` is not a sequence of strings.
        """
        if isinstance(cond, Tensor) or cond is None or isinstance(cond, (str, bytes)):
            raise ValueError(
                f"reward {self.name!r} needs prompt strings as its condition, got {type(cond).__name__}"
            )
        return [self.spec.prompt_prefix + p for p in cond]

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Input checks run by :meth:`forward`; subclasses extend them (channels, condition kind)."""
        check_condition(cond, check_images(images), kind="any")

    def forward(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """Validated :meth:`score`: ``(B, C, H, W)`` images in ``[0, 1]`` + condition → ``(B,)``."""
        if self.check_inputs:
            self.validate(images, cond)
        scores = self.score(images, cond)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(
                f"reward {self.name!r} returned scores of shape {tuple(scores.shape)}, expected ({images.shape[0]},)"
            )
        return scores

    def loss_from_score(self, score: Tensor) -> Tensor:
        """This reward's weighted per-sample loss ``(B,)`` for given scores ``(B,)``."""
        spec = self.spec
        return reward_loss(score, spec.loss_form, spec.margin, spec.weight)

    def loss(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """Weighted per-sample loss ``(B,)`` of decoded images (differentiable rewards only)."""
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} is not differentiable; it has no ReFL loss")
        return self.loss_from_score(self(images, cond))

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


@dataclass
class RewardOutput:
    """Result of :meth:`CompositeReward.forward`.

    Attributes:
        loss: ``(B,)`` summed weighted loss of the differentiable rewards (zeros if there are none);
            differentiable in the images: the ReFL loss is ``loss.mean()``.
        terms: Name → ``(B,)`` *unweighted* loss (``form(score)``) of each differentiable reward,
            differentiable in the images; the Trainer takes one gradient per term and weights it
            with :func:`dmdr_fast.ops.reward_grad_combine`.
        scores: Name → ``(B,)`` score of every reward (non-differentiable ones detached).
        logs: ``reward/<name>`` (mean score) and ``reward_loss/<name>`` (mean weighted loss, for
            differentiable rewards) as detached 0-dim tensors, so that building them costs no
            device sync; :meth:`log_values` converts them to floats.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)

    def log_values(self) -> dict[str, float]:
        """``logs`` as Python floats (one host sync per entry)."""
        return {k: float(v) for k, v in self.logs.items()}


class CompositeReward(nn.Module):
    """A weighted sum of rewards: ``ℓ = Σ_i weight_i · form_i(score_i)`` over differentiable ones
    (``weight_i``, ``form_i``: reward i's ``spec.weight``, ``spec.loss_form``/``spec.margin``).

    Args:
        rewards: One or more :class:`Reward` with distinct names.

    Raises:
        ValueError: If ``rewards`` is empty or names repeat.
    """

    def __init__(self, rewards: Sequence[Reward]) -> None:
        super().__init__()
        rewards = list(rewards)
        if not rewards:
            raise ValueError("rewards must contain at least one Reward")
        for r in rewards:
            if not isinstance(r, Reward):
                raise TypeError(f"rewards must be Reward instances, got {type(r).__name__}")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.rewards = nn.ModuleList(rewards)

    @property
    def members(self) -> list[Reward]:
        """The rewards in order (``self.rewards`` is the ModuleList that registers them)."""
        return cast("list[Reward]", list(self.rewards))

    @property
    def differentiable_rewards(self) -> list[Reward]:
        """The rewards that enter the ReFL loss."""
        return [r for r in self.members if r.differentiable]

    @property
    def non_differentiable_rewards(self) -> list[Reward]:
        """The rewards that are only scored (for a future group-relative branch) and logged."""
        return [r for r in self.members if not r.differentiable]

    def train(self, mode: bool = True) -> CompositeReward:
        """Rewards stay in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor, cond: RewardCondition) -> RewardOutput:
        """Score every reward and sum the weighted losses of the differentiable ones.

        Args:
            images: Decoded images ``(B, C, H, W)`` in ``[0, 1]``.
            cond: Class labels ``(B,)`` or B prompts.

        Returns:
            :class:`RewardOutput`.
        """
        batch = check_images(images, check_range=False)
        total = images.new_zeros(batch)
        scores: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        logs: dict[str, Tensor] = {}
        for r in self.members:
            if r.differentiable:
                score = r(images, cond)
                terms[r.name] = reward_loss(score, r.spec.loss_form, r.spec.margin)
                loss = r.spec.weight * terms[r.name]
                total = total + loss
                logs[f"reward_loss/{r.name}"] = loss.detach().mean()
            else:
                with torch.no_grad():
                    score = r(images.detach(), cond)
            scores[r.name] = score if r.differentiable else score.detach()
            logs[f"reward/{r.name}"] = score.detach().float().mean()
        return RewardOutput(loss=total, terms=terms, scores=scores, logs=logs)
