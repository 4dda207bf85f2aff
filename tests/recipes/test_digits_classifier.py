"""The digits CNN classifier: shapes, differentiability, augmentation, training, save/load."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.recipes.digits.classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    load_classifier,
    save_classifier,
    shift_augment,
    train_classifier,
)
from dmdr_fast.recipes.digits.data import load_digits_tensors, stratified_split, to_unit_range


def test_shapes_and_feature_dims():
    model = DigitClassifier(width=8, feature_dim=24).eval()
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    assert model(x).shape == (5, 10)
    feats = model.features(x)
    assert feats.shape == (5, 24) and model.feature_dim == 24 and model.num_classes == 10
    feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Samples are independent of their batch (no batch norm).
    torch.testing.assert_close(model(x[:2]), model(x)[:2])


def test_shape_errors_name_the_argument():
    model = DigitClassifier(width=4)
    with pytest.raises(ValueError, match=r"x must be images of shape \(B, 1, 8, 8\)"):
        model(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="image_size"):
        DigitClassifierConfig(image_size=6)
    with pytest.raises(ValueError, match="width"):
        DigitClassifierConfig(width=0)


def test_shift_augment():
    x = torch.zeros(6, 1, 8, 8)
    x[:, :, 3:5, 3:5] = torch.rand(6, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    y = shift_augment(x, 1, g)
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # content only moved
    assert torch.equal(shift_augment(x, 0), x)


def test_short_training_learns_and_is_deterministic():
    images, labels = load_digits_tensors()
    idx = stratified_split(labels, (0.25,), seed=0)[0]  # ~450 images
    x, y = to_unit_range(images[idx]), labels[idx]
    kwargs = dict(
        epochs=8, batch_size=32, lr=5e-3, seed=3, config=DigitClassifierConfig(width=8), progress=False
    )
    model, metrics = train_classifier(x, y, **kwargs)
    assert not model.training
    assert metrics["holdout_accuracy"] > 0.6, metrics  # chance is 0.1
    assert metrics["num_train"] + metrics["num_holdout"] == idx.numel()
    again, _ = train_classifier(x, y, **kwargs)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_train_classifier_rejects_model_range_images():
    images, labels = load_digits_tensors()
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        train_classifier(images[:20], labels[:20], epochs=1, progress=False)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(to_unit_range(images[:20]), labels[:19], epochs=1, progress=False)


def test_save_load_round_trip(tmp_path):
    model = DigitClassifier(width=6, feature_dim=16).eval()
    path = save_classifier(model, tmp_path / "sub" / "clf.pt", metrics={"acc": 0.5})
    loaded, extra = load_classifier(path)
    assert loaded.config == model.config and extra == {"metrics": {"acc": 0.5}}
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["clf.pt"]  # no temp files left
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a"):
        load_classifier(tmp_path / "bad.pt")
