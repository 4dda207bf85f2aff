"""Digits data: tensor format, range maps, and the stratified, disjoint, deterministic splits."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.recipes.digits.data import (
    DIGITS_IMAGE_SHAPE,
    DIGITS_NUM_CLASSES,
    digits_splits,
    load_digits_tensors,
    stratified_split,
    to_model_range,
    to_unit_range,
)


def test_load_digits_tensors_format():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, *DIGITS_IMAGE_SHAPE) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert sorted(labels.unique().tolist()) == list(range(DIGITS_NUM_CLASSES))
    # pixel / 16 · 2 − 1: every value is a multiple of 1/8 in [-1, 1]
    assert torch.equal((images + 1) * 8, ((images + 1) * 8).round())
    images[0] = 0.0  # fresh tensors: modifying them does not change the next load
    assert not torch.equal(load_digits_tensors()[0][0], images[0])


def test_range_maps_are_inverse():
    images, _ = load_digits_tensors()
    unit = to_unit_range(images)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    torch.testing.assert_close(to_model_range(unit), images)
    assert float(to_unit_range(torch.tensor([-3.0, 3.0])).min()) == 0.0  # clamped


def test_splits_disjoint_cover_and_stratified():
    _, labels = load_digits_tensors()
    splits = digits_splits(seed=0)
    reward, eval_ = set(splits.reward.tolist()), set(splits.eval.tolist())
    assert not reward & eval_
    assert reward | eval_ == set(range(1797))
    for c in range(DIGITS_NUM_CLASSES):
        n_c = int((labels == c).sum())
        n_reward = int((labels[splits.reward] == c).sum())
        assert abs(n_reward - n_c / 2) <= 1
    assert torch.equal(splits.teacher_indices, torch.arange(1797))
    assert torch.equal(splits.reference_indices, torch.arange(1797))
    h1, h2 = splits.reference_halves(labels)
    assert not set(h1.tolist()) & set(h2.tolist()) and h1.numel() + h2.numel() == 1797


def test_splits_deterministic_and_seeded():
    a, b, c = digits_splits(seed=0), digits_splits(seed=0), digits_splits(seed=1)
    assert torch.equal(a.reward, b.reward) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.reward, c.reward)
    small = digits_splits(seed=0, reward_fraction=0.3)
    assert abs(small.reward.numel() - 0.3 * 1797) < 12


def test_stratified_split_partial_and_errors():
    labels = torch.arange(100) % 4
    first, second = stratified_split(labels, (0.2, 0.3), seed=3)
    assert first.numel() == 20 and second.numel() == 28  # int(0.5·25) − int(0.2·25) = 7 per class
    assert not set(first.tolist()) & set(second.tolist())
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(labels, (0.7, 0.7), seed=0)
    with pytest.raises(ValueError, match="labels"):
        stratified_split(labels.float(), (0.5,), seed=0)
    with pytest.raises(ValueError, match="reward_fraction"):
        digits_splits(reward_fraction=1.0)
