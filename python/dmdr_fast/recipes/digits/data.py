"""scikit-learn's handwritten digits (1797 8×8 grayscale images, 10 classes), as torch tensors.

The data ships with scikit-learn, so everything here works offline. Pixels are integers 0..16;
the model range is ``[-1, 1]`` (``pixel / 16 · 2 − 1``), the reward/evaluation range ``[0, 1]``.

Who sees which data in the digits preset:

* **Teacher** — trains on *all* 1797 digits (:func:`load_digits_tensors`). It is the reference
  distribution the students are distilled from, so it should see as much data as possible.
* **Reward classifier** — trains on the ``reward`` split of :func:`digits_splits`.
* **Evaluation network** — trains on the ``eval`` split, disjoint from the ``reward`` split, so the
  metrics are not the quantity the reward optimises.
* **Metrics reference** — *all* 1797 digits (:meth:`DigitsSplits.reference_indices`), i.e. the
  distribution the teacher was trained on. The real-vs-real floor of the Fréchet distance is the
  distance between the two stratified halves of that set (:meth:`DigitsSplits.reference_halves`).

Both classifier splits are stratified by class and deterministic for a given seed: every class
is shuffled with its own generator derived from the seed and cut at the same fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "DIGITS_IMAGE_SHAPE",
    "DIGITS_NUM_CLASSES",
    "DigitsSplits",
    "digits_splits",
    "load_digits_tensors",
    "stratified_split",
    "to_model_range",
    "to_unit_range",
]

#: ``(C, H, W)`` of one digit.
DIGITS_IMAGE_SHAPE: tuple[int, int, int] = (1, 8, 8)
#: Number of classes (the digits 0–9).
DIGITS_NUM_CLASSES: int = 10
_PIXEL_MAX = 16.0


@lru_cache(maxsize=1)
def _load_raw() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # deferred: scikit-learn imports in ~1 s

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return pixels, labels


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits in the model range.

    Returns:
        ``(images, labels)``: float32 images ``(1797, 1, 8, 8)`` in ``[-1, 1]``
        (``pixel / 16 · 2 − 1``) and int64 labels ``(1797,)`` in ``[0, 10)``. Fresh tensors on
        every call (the raw data is cached), so callers may modify them.
    """
    pixels, labels = _load_raw()
    return pixels / _PIXEL_MAX * 2.0 - 1.0, labels.clone()


def to_unit_range(images: Tensor) -> Tensor:
    """Model range ``[-1, 1]`` → ``[0, 1]`` (``(x + 1) / 2``, clamped), differentiably.

    Args:
        images: ``(B, C, H, W)`` images (or any tensor) in the model range.

    Returns:
        The same shape, values in ``[0, 1]``.
    """
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def to_model_range(images: Tensor) -> Tensor:
    """``[0, 1]`` → model range ``[-1, 1]`` (``2x − 1``); the inverse of :func:`to_unit_range`."""
    return images * 2.0 - 1.0


def stratified_split(labels: Tensor, fractions: tuple[float, ...], seed: int) -> list[Tensor]:
    """Split indices into disjoint parts with (about) the same class proportions in each.

    Each class's indices are shuffled with a generator seeded by ``(seed, class)`` and cut at the
    cumulative fractions (rounded down; the last part takes the remainder). The result depends only
    on ``labels``, ``fractions`` and ``seed``.

    Args:
        labels: ``(N,)`` integer labels.
        fractions: Fractions of each class per part, positive, summing to at most 1 (a sum below 1
            leaves the rest unused).
        seed: Shuffle seed.

    Returns:
        One sorted int64 index tensor per fraction; pairwise disjoint.

    Raises:
        ValueError: If ``labels`` is not 1-D integer or the fractions are invalid.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {fractions}")
    parts: list[list[Tensor]] = [[] for _ in fractions]
    labels = labels.cpu()
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(c))
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n = idx.numel()
        start, cum = 0, 0.0
        for i, f in enumerate(fractions):
            cum += f
            stop = n if (i == len(fractions) - 1 and sum(fractions) >= 1.0 - 1e-9) else int(cum * n)
            parts[i].append(idx[start:stop])
            start = stop
    return [torch.sort(torch.cat(p)).values for p in parts]


@dataclass(frozen=True)
class DigitsSplits:
    """Index sets into :func:`load_digits_tensors` for the digits preset.

    Attributes:
        reward: ``(N_r,)`` indices the reward classifier trains on (its own held-out part is cut
            from these by :func:`~dmdr_fast.recipes.digits.classifier.train_classifier`).
        eval: ``(N_e,)`` indices the evaluation network trains on; disjoint from ``reward``.
        num_total: Number of digits (1797).
        seed: Seed the splits were drawn with.
    """

    reward: Tensor
    eval: Tensor
    num_total: int
    seed: int

    @property
    def teacher_indices(self) -> Tensor:
        """All digits: the teacher trains on the whole data set."""
        return torch.arange(self.num_total)

    @property
    def reference_indices(self) -> Tensor:
        """All digits: the real set the metrics (FD, precision/recall) compare samples against."""
        return torch.arange(self.num_total)

    def reference_halves(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Two disjoint stratified halves of the reference set, for the real-vs-real FD floor.

        Args:
            labels: ``(num_total,)`` labels from :func:`load_digits_tensors`.

        Returns:
            Two sorted index tensors.
        """
        if labels.shape != (self.num_total,):
            raise ValueError(f"labels must have shape ({self.num_total},), got {tuple(labels.shape)}")
        first, second = stratified_split(labels, (0.5, 0.5), self.seed + 1)
        return first, second


def digits_splits(seed: int = 0, reward_fraction: float = 0.5) -> DigitsSplits:
    """Deterministic stratified split of the digits into reward-classifier and evaluation sets.

    Args:
        seed: Split seed.
        reward_fraction: Fraction of every class given to the reward classifier; the rest goes to
            the evaluation network. Must lie in ``(0, 1)``.

    Returns:
        :class:`DigitsSplits` with disjoint ``reward`` and ``eval`` indices covering all digits.
    """
    if not 0.0 < reward_fraction < 1.0:
        raise ValueError(f"reward_fraction must lie in (0, 1), got {reward_fraction}")
    _, labels = _load_raw()
    reward, eval_ = stratified_split(labels, (reward_fraction, 1.0 - reward_fraction), seed)
    return DigitsSplits(reward=reward, eval=eval_, num_total=int(labels.numel()), seed=seed)
