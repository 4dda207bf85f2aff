"""Classifier reward: the log-probability a frozen classifier gives the conditioning label (ReFL).

With ``mode="ce"`` and the default ``spec.loss_form="neg"``, the per-sample loss is exactly
``spec.weight · F.cross_entropy(classifier(images), labels, reduction="none")`` — the paper's
class-conditional stage-2 reward (``0.05 · cross-entropy`` of a frozen classifier; docs/method.md
§11).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.spec import RewardSpec

__all__ = ["CLASSIFIER_MODES", "ClassifierReward"]

ClassifierMode = Literal["ce", "logprob", "prob", "correct"]
#: Score definitions of :class:`ClassifierReward`.
CLASSIFIER_MODES: tuple[str, ...] = ("ce", "logprob", "prob", "correct")


class ClassifierReward(Reward):
    """Score = how strongly a frozen classifier recognises the conditioning class.

    Modes (``labels`` are the condition):

    * ``"ce"``: ``score = −F.cross_entropy(logits, labels, reduction="none") = log p(label | image)``,
      computed with ``F.cross_entropy`` so that the ``"neg"`` loss equals the cross-entropy bit for
      bit;
    * ``"logprob"``: the same quantity as ``log_softmax(logits)[label]`` (equal up to rounding);
    * ``"prob"``: ``p(label | image)`` in ``[0, 1]`` — bounded, which suits a hinge
      (``RewardSpec(loss_form="hinge", margin=0.9)``);
    * ``"correct"``: ``1.0`` if the classifier's top class is the label, else ``0.0`` — a verdict
      with no gradient (``differentiable`` is False), for group-relative policy optimisation
      (docs/method.md §12).

    The classifier is frozen *in place* (``requires_grad_(False)``, eval mode) when the reward is
    built; gradients still flow to the images. Logits are computed in the classifier's precision and
    turned into scores in float32.

    Args:
        classifier: Any module mapping images ``(B, C, H, W)`` in ``[0, 1]`` to logits ``(B, K)``,
            e.g. :class:`dmdr_fast.recipes.digits.classifier.DigitClassifier`.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (name, weight, loss form,
            margin); ``None``: ``RewardSpec(name="classifier")``.
        mode: ``"ce"``, ``"logprob"`` or ``"prob"``.
        num_classes: K, for checking labels before the forward; read from ``classifier.num_classes``
            when present, else labels are checked against the logits.
        in_channels: Required image channels; read from ``classifier.config.in_channels`` when
            present.
        check_inputs: Validate images, labels and logits on every call (a few host syncs).
    """

    default_name = "classifier"

    def __init__(
        self,
        classifier: nn.Module,
        *,
        spec: RewardSpec | None = None,
        mode: ClassifierMode = "ce",
        num_classes: int | None = None,
        in_channels: int | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        if mode not in CLASSIFIER_MODES:
            raise ValueError(f"mode must be one of {CLASSIFIER_MODES}, got {mode!r}")
        self.classifier = classifier.requires_grad_(False)
        self.mode: ClassifierMode = mode
        self.differentiable = mode != "correct"
        self.num_classes = (
            num_classes if num_classes is not None else getattr(classifier, "num_classes", None)
        )
        config = getattr(classifier, "config", None)
        self.in_channels = in_channels if in_channels is not None else getattr(config, "in_channels", None)
        self.train(False)  # puts the classifier in eval mode (Reward.train always means eval)

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` with the classifier's channels; labels ``(B,)`` in ``[0, K)``."""
        batch = check_images(images, channels=self.in_channels)
        check_condition(cond, batch, kind="labels")
        assert isinstance(cond, Tensor)
        if self.num_classes is not None:
            self._check_label_range(cond, self.num_classes)

    @staticmethod
    def _check_label_range(labels: Tensor, num_classes: int) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"cond labels must lie in [0, {num_classes}), got min {int(labels.min())}, max {int(labels.max())}"
            )

    def logits(self, images: Tensor) -> Tensor:
        """The frozen classifier's logits ``(B, K)``."""
        return self.classifier(images)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` score of images ``(B, C, H, W)`` in ``[0, 1]`` for labels ``cond`` ``(B,)``."""
        assert isinstance(cond, Tensor)
        logits = self.logits(images)
        if self.check_inputs:
            if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
                raise RuntimeError(
                    f"classifier returned shape {tuple(logits.shape)}, expected ({images.shape[0]}, K) logits"
                )
            if self.num_classes is None:
                self._check_label_range(cond, logits.shape[1])
        labels = cond.to(device=logits.device, dtype=torch.long)
        logits = logits.float()
        if self.mode == "ce":
            return -F.cross_entropy(logits, labels, reduction="none")
        if self.mode == "correct":
            return (logits.argmax(dim=1) == labels).float().detach()
        logp = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        return logp if self.mode == "logprob" else logp.exp()
