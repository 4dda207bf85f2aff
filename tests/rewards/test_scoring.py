"""Rewards without gradients: JPEG size, the classifier's 0/1 verdict, and robust scoring of a
batch whose scorer fails, is slow or returns NaN for some samples (docs/method.md §12)."""

from __future__ import annotations

import time

import pytest
import torch

from dmdr_fast.rewards import ClassifierReward
from dmdr_fast.rewards.jpeg import JpegReward, jpeg_kilobytes
from dmdr_fast.rewards.scoring import score_robustly


def test_jpeg_size_orders_flat_below_noisy_images():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 64, 64), 0.5)
    noisy = torch.rand(2, 3, 64, 64, generator=g)
    kb_flat, kb_noisy = jpeg_kilobytes(flat), jpeg_kilobytes(noisy)
    assert (kb_flat < kb_noisy / 5).all() and (kb_flat > 0).all()
    images = torch.cat([flat[:1], noisy[:1]])
    comp, incomp = JpegReward("compressibility"), JpegReward("incompressibility")
    assert comp(images, None)[0] > comp(images, None)[1]  # compressibility prefers the flat one
    torch.testing.assert_close(incomp(images, None), -comp(images, None))
    assert not comp.differentiable and comp.name == "jpeg_compressibility"
    assert jpeg_kilobytes(torch.rand(1, 1, 16, 16)).shape == (1,)  # grayscale
    with pytest.raises(TypeError, match="not differentiable"):
        comp.loss(images, None)
    with pytest.raises(ValueError, match="direction"):
        JpegReward("smaller")


def test_classifier_verdict_is_zero_one_without_gradient():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        clf[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        clf[1].bias.zero_()
    images = torch.eye(4)[:3].view(3, 1, 2, 2)  # image i lights up pixel i → class i
    reward = ClassifierReward(clf, mode="correct", num_classes=3, in_channels=1)
    assert not reward.differentiable
    torch.testing.assert_close(reward(images, torch.tensor([0, 2, 2])), torch.tensor([1.0, 0.0, 1.0]))


def test_failures_and_nans_lose_only_their_samples():
    calls = []

    def flaky(images, cond):  # raises whenever sample value 3 is in the call, NaN for value 5
        calls.append(len(images))
        v = images.flatten(1)[:, 0]
        if (v == 3).any():
            raise RuntimeError("judge timed out")
        out = v.clone()
        out[v == 5] = float("nan")
        return out

    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    labels = torch.arange(8)
    rep = score_robustly([("flaky", flaky), ("ok", lambda im, c: c.float())], images, labels, chunk_size=4)
    s = rep.scores
    assert s.shape == (8, 2)
    assert torch.isnan(s[3, 0]) and torch.isnan(s[5, 0])
    keep = [0, 1, 2, 4, 6, 7]
    torch.testing.assert_close(s[keep, 0], torch.tensor(keep, dtype=torch.float32))
    torch.testing.assert_close(s[:, 1], labels.float())  # the other reward is untouched
    assert rep.failed == {"flaky": 1} and rep.nonfinite == {"flaky": 1}
    assert "judge timed out" in rep.messages["flaky"] and "1 failed, 1 non-finite" in rep.summary()
    assert calls[:2] == [4, 1]  # the failing chunk is retried sample by sample


def test_wrong_shapes_infinities_and_prompt_conditions():
    images = torch.rand(3, 3, 4, 4)
    rep = score_robustly(
        [("shape", lambda im, c: torch.ones(len(im) + 1)), ("inf", lambda im, c: torch.tensor([1.0, float("inf"), 2.0])[: len(im)]),
         ("prompt", lambda im, c: [float(len(p)) for p in c])],
        images, ["a", "bb", "ccc"], chunk_size=2,
    )  # fmt: skip
    assert torch.isnan(rep.scores[:, 0]).all() and rep.failed["shape"] == 3
    assert torch.isnan(rep.scores[1, 1]) and rep.nonfinite["inf"] == 1  # ±Inf counts as missing
    torch.testing.assert_close(rep.scores[:, 2], torch.tensor([1.0, 2.0, 3.0]))


def test_slow_scorer_runs_in_chunks_with_progress(capsys):
    seen = []

    def slow(images, cond):
        time.sleep(0.01)
        seen.append(len(images))
        return torch.zeros(len(images))

    rep = score_robustly(
        [("slow", slow)], torch.rand(10, 1, 2, 2), torch.arange(10), chunk_size=4, progress=True
    )
    assert seen == [4, 4, 2] and not rep.summary()
    with pytest.raises(ValueError, match="chunk_size"):
        score_robustly([("slow", slow)], torch.rand(1, 1, 2, 2), None, chunk_size=0)


def test_ink_counts_bright_pixels_and_builds_from_a_config():
    from dmdr_fast.config import RewardConfig
    from dmdr_fast.rewards import InkReward, reward_from_config

    images = torch.zeros(2, 1, 4, 4)
    images[0, 0, :2] = 1.0  # half the canvas inked
    images[1, 0, 0, 0] = 0.5  # exactly the threshold: not ink
    assert InkReward()(images, None).tolist() == [0.5, 0.0]
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[0, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0])  # channel mean 2/3 > 0.5
    assert InkReward()(rgb, None).tolist() == [0.25]
    ink = reward_from_config(RewardConfig(kind="ink", weight=1.0, kwargs={"threshold": 0.25}))
    assert isinstance(ink, InkReward) and ink.threshold == 0.25 and not ink.differentiable
    jpeg = reward_from_config(
        RewardConfig(kind="jpeg", weight=1.0, kwargs={"direction": "incompressibility"})
    )
    assert jpeg.direction == "incompressibility"
    with pytest.raises(ValueError, match="threshold"):
        InkReward(1.5)
