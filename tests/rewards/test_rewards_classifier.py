"""Reward protocol and the classifier reward: exact ReFL loss, gradient flow, loss forms, composite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr_fast.recipes.digits.classifier import DigitClassifier
from dmdr_fast.rewards import (
    ClassifierReward,
    CompositeReward,
    Reward,
    RewardCondition,
    RewardSpec,
    check_condition,
    reward_loss,
)


@pytest.fixture
def classifier() -> DigitClassifier:
    torch.manual_seed(0)
    return DigitClassifier(width=8, feature_dim=16).eval()


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 8, 8, generator=g), torch.tensor([0, 3, 9, 3, 1, 7])


class MeanBrightness(Reward):
    """A toy non-differentiable reward (stands in for OCR / detectors / VLM judges)."""

    differentiable = False

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        return images.mean(dim=(1, 2, 3)).round()


def test_ce_loss_equals_cross_entropy_exactly(classifier, data):
    x, y = data
    reward = ClassifierReward(classifier, spec=RewardSpec("classifier", weight=1.0), mode="ce")
    ce = F.cross_entropy(classifier(x), y, reduction="none")
    assert torch.equal(reward.loss(x, y), ce)
    assert torch.equal(reward(x, y), -ce)  # score = log p(label | image)
    weighted = ClassifierReward(classifier, spec=RewardSpec("w", weight=0.05), mode="ce")
    torch.testing.assert_close(weighted.loss(x, y), 0.05 * ce)


def test_logprob_and_prob_modes(classifier, data):
    x, y = data
    logp = torch.log_softmax(classifier(x), dim=1)[torch.arange(6), y]
    torch.testing.assert_close(ClassifierReward(classifier, mode="logprob")(x, y), logp)
    prob = ClassifierReward(classifier, mode="prob")(x, y)
    torch.testing.assert_close(prob, logp.exp())
    assert bool(((prob >= 0) & (prob <= 1)).all())
    with pytest.raises(ValueError, match="mode"):
        ClassifierReward(classifier, mode="nll")  # type: ignore[arg-type]


def test_gradients_reach_images_not_classifier(classifier, data):
    x, y = data
    reward = ClassifierReward(classifier)
    assert not classifier.training and all(not p.requires_grad for p in classifier.parameters())
    reward.train()  # a Trainer calling .train() on a parent must not enable dropout
    assert not classifier.training
    x = x.clone().requires_grad_(True)
    reward.loss(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())
    # Exactly the gradient of the plain cross-entropy through the same network.
    x2 = x.detach().clone().requires_grad_(True)
    F.cross_entropy(classifier(x2), y, reduction="sum").backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_hinge_and_neg_forms(classifier, data):
    x, y = data
    prob = ClassifierReward(classifier, mode="prob")(x, y)
    hinge = ClassifierReward(
        classifier, spec=RewardSpec("h", weight=2.0, loss_form="hinge", margin=0.7), mode="prob"
    )
    torch.testing.assert_close(hinge.loss(x, y), 2.0 * torch.relu(0.7 - prob))
    score = torch.tensor([0.2, 0.9, 0.7], requires_grad=True)
    loss = reward_loss(score, "hinge", margin=0.7)
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.0, 0.0]))
    loss.sum().backward()
    assert score.grad is not None and score.grad.tolist() == [-1.0, 0.0, 0.0]  # no push past the margin
    torch.testing.assert_close(reward_loss(score.detach(), "neg", weight=3.0), -3.0 * score.detach())
    with pytest.raises(ValueError, match="loss_form"):
        reward_loss(score, "square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_form"):
        ClassifierReward(classifier, spec=RewardSpec("c", loss_form="square"))  # type: ignore[arg-type]


def test_composite_sums_weighted_losses_and_logs(classifier, data):
    x, y = data
    a = ClassifierReward(classifier, spec=RewardSpec("ce", weight=0.5))
    b = ClassifierReward(
        classifier, spec=RewardSpec("p", weight=2.0, loss_form="hinge", margin=0.9), mode="prob"
    )
    c = MeanBrightness(spec=RewardSpec("bright"))
    composite = CompositeReward([a, b, c])
    assert composite.differentiable_rewards == [a, b] and composite.non_differentiable_rewards == [c]
    x = x.clone().requires_grad_(True)
    out = composite(x, y)
    torch.testing.assert_close(out.loss, a.loss(x, y) + b.loss(x, y))  # c is scored, not in the loss
    assert out.loss.shape == (6,)
    assert set(out.scores) == {"ce", "p", "bright"} and not out.scores["bright"].requires_grad
    logs = out.log_values()
    assert set(logs) == {"reward/ce", "reward/p", "reward/bright", "reward_loss/ce", "reward_loss/p"}
    assert logs["reward/ce"] == pytest.approx(float(a(x, y).detach().mean()))
    assert logs["reward_loss/p"] == pytest.approx(float(b.loss(x, y).detach().mean()))
    out.loss.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="not differentiable"):
        c.loss(x, y)


def test_composite_errors(classifier):
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward([])
    with pytest.raises(ValueError, match="unique"):
        CompositeReward([ClassifierReward(classifier), ClassifierReward(classifier)])
    with pytest.raises(TypeError, match="Reward instances"):
        CompositeReward([classifier])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="weight"):
        ClassifierReward(classifier, spec=RewardSpec("c", weight=float("nan")))


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (
            torch.rand(4, 1, 8, 8) * 2 - 1,
            torch.zeros(4, dtype=torch.long),
            r"images must be decoded images in \[0, 1\]",
        ),
        (torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), "images must be decoded"),
        (
            torch.rand(4, 8, 8),
            torch.zeros(4, dtype=torch.long),
            r"images must be a floating-point \(B, C, H, W\)",
        ),
        (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "images must have 1 channels"),
        (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), "cond has 3 labels but images has 4"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4), "cond must be integer class labels"),
        (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]), r"cond labels must lie in \[0, 10\)"),
        (torch.rand(4, 1, 8, 8), ["a", "b", "c", "d"], "cond must be an int64 label tensor"),
    ],
)
def test_bad_inputs_name_the_argument(classifier, images, labels, match):
    with pytest.raises(ValueError, match=match):
        ClassifierReward(classifier)(images, labels)


def test_label_range_checked_from_logits_for_generic_classifier(data):
    x, _ = data
    generic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    reward = ClassifierReward(generic)
    assert reward.num_classes is None
    assert reward(x, torch.tensor([0, 1, 2, 3, 0, 1])).shape == (6,)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        reward(x, torch.tensor([0, 1, 2, 3, 4, 1]))


def test_check_condition_prompts():
    check_condition(["a cat", "a dog"], 2, kind="prompts")
    check_condition(None, 2)
    with pytest.raises(ValueError, match="cond has 1 prompts but images has 2"):
        check_condition(["a cat"], 2)
    with pytest.raises(ValueError, match="prompt strings"):
        check_condition(torch.zeros(2, dtype=torch.long), 2, kind="prompts")
    with pytest.raises(ValueError, match="cond must be"):
        check_condition("a cat", 1)
