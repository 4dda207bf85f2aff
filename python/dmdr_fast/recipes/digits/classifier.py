"""A small CNN classifier for 8×8 grayscale digits: the reward model and the evaluation network.

The digits preset trains two instances of :class:`DigitClassifier` on disjoint data splits
(:func:`dmdr_fast.recipes.digits.data_splits`), with different seeds and widths:

* the **reward classifier** — frozen, its log-probability of the conditioning label is the
  training reward (:class:`dmdr_fast.rewards.ClassifierReward`);
* the **evaluation network** — never seen by training; its logits give class accuracy and its
  penultimate features (:meth:`DigitClassifier.features`) the Fréchet distance, precision and
  recall of :mod:`dmdr_fast.eval`.

Inputs are images in ``[0, 1]`` (what :meth:`FlowModelAdapter.decode` returns), shape
``(B, C, H, W)``. Everything is differentiable with respect to the input, which is what ReFL
needs. There is no batch normalisation, so a sample's output never depends on the rest of its batch
and train/eval mode differ only by dropout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr_fast._io import RESAVE_TENSORS, atomic_save, load_torch_file

__all__ = [
    "DigitClassifier",
    "DigitClassifierConfig",
    "load_classifier",
    "save_classifier",
    "shift_augment",
    "train_classifier",
]

_FORMAT = "dmdr_fast.digit_classifier/1"


@dataclass(frozen=True)
class DigitClassifierConfig:
    """Architecture of a :class:`DigitClassifier`.

    Attributes:
        width: Channels of the first two conv layers (the third has ``2·width``).
        feature_dim: Size F of the penultimate layer (the evaluation features).
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Side of the square input; must be divisible by 4 (two 2×2 poolings).
        dropout: Dropout before the output layer (training mode only).
    """

    width: int = 32
    feature_dim: int = 64
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "num_classes", "in_channels", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DigitClassifierConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % 4:
            raise ValueError(
                f"DigitClassifierConfig.image_size must be divisible by 4, got {self.image_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DigitClassifierConfig.dropout must lie in [0, 1), got {self.dropout}")


class DigitClassifier(nn.Module):
    """conv3×3 → conv3×3 → pool → conv3×3 → pool → linear (features) → linear (logits).

    Args:
        config: Architecture; the defaults when ``None``.
        **overrides: Fields of :class:`DigitClassifierConfig` overriding ``config``.
    """

    def __init__(self, config: DigitClassifierConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = dataclasses.replace(config or DigitClassifierConfig(), **overrides)
        self.config = config
        w, c = config.width, config.in_channels
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        pooled = (config.image_size // 4) ** 2
        # SiLU rather than ReLU in the feature layer: no dead units, so the feature covariance used
        # by the Fréchet distance stays full rank.
        self.feature_layer = nn.Sequential(nn.Linear(2 * w * pooled, config.feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def feature_dim(self) -> int:
        """F, the size of :meth:`features`."""
        return self.config.feature_dim

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.config.num_classes

    def _check(self, x: Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be images of shape (B, {', '.join(map(str, expected))}), got {got}")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features.

        Args:
            x: Images ``(B, C, H, W)`` in ``[0, 1]``.

        Returns:
            ``(B, F)`` features (differentiable in ``x``).
        """
        self._check(x)
        return self.feature_layer(self.body(x * 2.0 - 1.0))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)`` in ``[0, 1]``."""
        return self.head(self.dropout(self.features(x)))


def shift_augment(images: Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Translate every image by an independent random integer offset, filling with zeros.

    Args:
        images: ``(B, C, H, W)`` images in ``[0, 1]`` (0 = background).
        max_shift: Largest shift in pixels along each axis.
        generator: RNG for the offsets (on the CPU).

    Returns:
        ``(B, C, H, W)`` shifted images.
    """
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator).to(images.device)
    rows = dy + torch.arange(h, device=images.device)  # (B, H) rows of the padded image to keep
    cols = dx + torch.arange(w, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _check_data(images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W) in [0, 1], got {got}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer of shape ({images.shape[0]},) to match images, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"images must lie in [0, 1] (use dmdr_fast.data.to_unit_range), got [{lo:.3g}, {hi:.3g}]"
        )


@torch.no_grad()
def _evaluate(model: DigitClassifier, images: Tensor, labels: Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    logits = torch.cat([model(images[i : i + 1024]) for i in range(0, images.shape[0], 1024)])
    model.train(was_training)
    loss = float(F.cross_entropy(logits, labels))
    return float((logits.argmax(1) == labels).float().mean()), loss


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    holdout_fraction: float = 0.2,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    config: DigitClassifierConfig | None = None,
    progress: bool = True,
) -> tuple[DigitClassifier, dict[str, float]]:
    """Train a :class:`DigitClassifier` and measure its accuracy on a held-out part of the data.

    A stratified ``holdout_fraction`` of ``(images, labels)`` (drawn with ``seed``) is kept out of
    training. AdamW with a cosine learning-rate decay; optional ±1-pixel random shifts. The whole
    run (initialisation, shuffling, dropout, augmentation) is seeded by ``seed`` and leaves the
    global RNG untouched, so the result is reproducible.

    Args:
        images: ``(N, C, H, W)`` training images in ``[0, 1]``.
        labels: ``(N,)`` integer labels.
        epochs: Passes over the training part.
        lr: Peak learning rate.
        seed: Seed of the initialisation and of every random draw.
        augment: Random ±1-pixel shifts of training batches.
        holdout_fraction: Fraction held out for accuracy, in ``[0, 1)``; 0 disables the holdout
            (the held-out metrics are then NaN).
        batch_size: Mini-batch size.
        weight_decay: AdamW weight decay.
        config: Architecture (default :class:`DigitClassifierConfig`).
        progress: Show a tqdm progress bar.

    Returns:
        ``(model, metrics)``: the model in eval mode, and ``train_accuracy``, ``holdout_accuracy``,
        ``holdout_loss``, ``num_train``, ``num_holdout``, ``epochs``, ``seconds``.

    Raises:
        ValueError: On malformed data or arguments.
    """
    from dmdr_fast.recipes.digits.data import stratified_split

    _check_data(images, labels)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    labels = labels.long()
    if holdout_fraction > 0:
        train_idx, hold_idx = stratified_split(labels, (1.0 - holdout_fraction, holdout_fraction), seed)
    else:
        train_idx, hold_idx = torch.arange(labels.numel()), torch.empty(0, dtype=torch.long)
    x_train, y_train = images[train_idx], labels[train_idx]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier(config)
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
        )
        bar = _progress(epochs, "classifier", progress)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0], generator=gen)
            for i in range(0, order.numel(), batch_size):
                idx = order[i : i + batch_size]
                xb = shift_augment(x_train[idx], 1, gen) if augment else x_train[idx]
                loss = F.cross_entropy(model(xb), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.close()
    model.eval()
    train_acc, _ = _evaluate(model, x_train, y_train)
    hold_acc, hold_loss = math.nan, math.nan
    if hold_idx.numel():
        hold_acc, hold_loss = _evaluate(model, images[hold_idx], labels[hold_idx])
    metrics = {
        "train_accuracy": train_acc,
        "holdout_accuracy": hold_acc,
        "holdout_loss": hold_loss,
        "num_train": float(train_idx.numel()),
        "num_holdout": float(hold_idx.numel()),
        "epochs": float(epochs),
        "seconds": time.perf_counter() - start,
    }
    return model, metrics


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def save_classifier(model: DigitClassifier, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Write the classifier's config and weights to ``path`` atomically (temp file + rename).

    Args:
        model: The classifier.
        path: Output file (``.pt``); parent directories are created.
        **extra: Further entries stored alongside (e.g. training metrics); plain Python values.

    Returns:
        The path written.
    """
    payload = {
        "format": _FORMAT,
        "config": dataclasses.asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    return atomic_save(payload, path)


def load_classifier(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Load a classifier written by :func:`save_classifier`.

    Args:
        path: The file.
        map_location: Device for the weights.

    Returns:
        ``(model, extra)``: the model in eval mode and the extra entries saved with it.

    Raises:
        ValueError: If the file is not a classifier file of this format.
    """
    payload = load_torch_file(path, map_location=map_location, convert=RESAVE_TENSORS)
    if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a {_FORMAT} file")
    model = DigitClassifier(DigitClassifierConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    extra = {k: v for k, v in payload.items() if k not in ("format", "config", "state_dict")}
    return model.to(map_location).eval(), extra
