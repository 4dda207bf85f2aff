"""Tests for dmdr_fast.eval.metrics: closed forms, hand-checkable cases and input errors."""

from __future__ import annotations

import math
import time

import pytest
import torch

from dmdr_fast.eval import (
    RealReference,
    class_accuracy,
    compute_features,
    evaluate_features,
    evaluate_samples,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    knn_radii,
    mmd_rbf,
    precision_recall,
    within_class_diversity,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_orthogonal(f: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(f, f, generator=_gen(seed), dtype=F64))
    return q


def _closed_form_commuting(mu1, mu2, a, b) -> float:
    # S1 = Q diag(a) Qᵀ and S2 = Q diag(b) Qᵀ commute, so (S1 S2)^½ = Q diag(sqrt(ab)) Qᵀ and
    # Tr(S1 + S2 - 2 (S1 S2)^½) = Σ (sqrt(a) - sqrt(b))².
    return float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())


# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def test_fd_diagonal_closed_form():
    mu1 = torch.tensor([0.0, 1.0, -2.0], dtype=F64)
    mu2 = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    a = torch.tensor([1.0, 4.0, 9.0], dtype=F64)
    b = torch.tensor([4.0, 1.0, 9.0], dtype=F64)
    # By hand: ‖Δμ‖² = 1 + 0 + 4 = 5; trace term = (1-2)² + (2-1)² + 0 = 2.
    fd = frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(7.0, abs=1e-10)


def test_fd_rotated_commuting_closed_form():
    q = _random_orthogonal(6, seed=1)
    a = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 10.0], dtype=F64)
    b = torch.tensor([1.0, 0.2, 4.0, 0.0, 3.0, 1.0], dtype=F64)  # b has a zero: S2 rank-deficient
    mu1 = torch.randn(6, generator=_gen(2), dtype=F64)
    mu2 = torch.randn(6, generator=_gen(3), dtype=F64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    expected = _closed_form_commuting(mu1, mu2, a, b)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fd_non_commuting_matches_scipy_and_is_symmetric():
    linalg = pytest.importorskip("scipy.linalg")
    f = 8
    x1 = torch.randn(f, f, generator=_gen(4), dtype=F64)
    x2 = torch.randn(f, f, generator=_gen(5), dtype=F64)
    s1, s2 = x1 @ x1.T / f, x2 @ x2.T / f
    mu1, mu2 = torch.zeros(f, dtype=F64), torch.ones(f, dtype=F64)
    cross = linalg.sqrtm((s1 @ s2).numpy()).real.trace()
    expected = f + float(torch.trace(s1) + torch.trace(s2)) - 2.0 * cross
    fd12 = frechet_distance_from_stats(mu1, s1, mu2, s2)
    fd21 = frechet_distance_from_stats(mu2, s2, mu1, s1)
    assert fd12 == pytest.approx(expected, rel=1e-8)
    assert fd12 == pytest.approx(fd21, rel=1e-10)


def test_fd_same_distribution_many_samples_is_near_zero():
    mix = torch.randn(4, 4, generator=_gen(6))
    x1 = torch.randn(20000, 4, generator=_gen(7)) @ mix + 3.0
    x2 = torch.randn(20000, 4, generator=_gen(8)) @ mix + 3.0
    assert frechet_distance(x1, x2) < 0.01
    assert frechet_distance(x1, x1) == pytest.approx(0.0, abs=1e-9)


def test_fd_from_samples_matches_closed_form():
    a = torch.tensor([1.0, 4.0, 0.25], dtype=F64)
    b = torch.tensor([2.0, 1.0, 0.25], dtype=F64)
    mu2 = torch.tensor([0.5, 0.0, -0.5], dtype=F64)
    x1 = torch.randn(50000, 3, generator=_gen(9), dtype=F64) * a.sqrt()
    x2 = torch.randn(50000, 3, generator=_gen(10), dtype=F64) * b.sqrt() + mu2
    expected = _closed_form_commuting(torch.zeros(3, dtype=F64), mu2, a, b)
    fd = frechet_distance(x1, x2)
    assert fd == pytest.approx(expected, rel=0.05)
    assert frechet_distance(x2, x1) == pytest.approx(fd, rel=1e-9)


def test_fd_rank_deficient_covariances():
    # Fewer samples than dimensions, plus a dead (constant) feature: both covariances are singular.
    x = torch.randn(5, 10, generator=_gen(11), dtype=F64)
    x[:, 3] = 0.0
    y = x + 0.5
    _, s_x = gaussian_stats(x)
    assert torch.linalg.matrix_rank(s_x) < 10
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, y) == pytest.approx(10 * 0.25, rel=1e-7)  # pure mean shift
    assert math.isfinite(frechet_distance(x, torch.randn(7, 10, generator=_gen(12))))


def test_gaussian_stats_matches_torch_cov():
    x = torch.randn(100, 5, generator=_gen(13))
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == F64 and sigma.shape == (5, 5)
    torch.testing.assert_close(sigma, torch.cov(x.double().T))


def test_fd_errors():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"expected shape \(N, F\)"):
        frechet_distance(torch.randn(10), torch.randn(10, 1))
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        frechet_distance(bad, torch.randn(10, 3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


# --------------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------------

REAL_1D = torch.tensor([[0.0], [1.0], [3.0], [7.0]])


def test_knn_radii_hand_example():
    torch.testing.assert_close(knn_radii(REAL_1D, k=1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=F64))
    torch.testing.assert_close(knn_radii(REAL_1D, k=2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=F64))


def test_precision_recall_hand_example_1d():
    # k = 1. Real radii [1, 1, 2, 4] -> real manifold = [-1, 11].
    # Fake [0.5, 1, 12, 12.5, 20] has radii [0.5, 0.5, 0.5, 0.5, 7.5]
    # -> fake manifold = [0, 1.5] ∪ [11.5, 27.5].
    # precision: 0.5 and 1 lie in [-1, 11]              -> 2/5.
    # recall: real 0 (on the closed boundary) and 1 in  -> 2/4.
    fake = torch.tensor([[0.5], [1.0], [12.0], [12.5], [20.0]])
    precision, recall = precision_recall(REAL_1D, fake, k=1)
    assert precision == pytest.approx(0.4)
    assert recall == pytest.approx(0.5)


def test_precision_recall_identical_and_disjoint():
    x = torch.randn(300, 16, generator=_gen(14))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    far = torch.randn(300, 16, generator=_gen(15)) + 100.0
    assert precision_recall(x, far) == (0.0, 0.0)


def test_precision_recall_duplicated_samples():
    # A collapsed generator: every sample identical. Radii are 0, distances exact, so it is inside the
    # real manifold iff its one point is, and it covers no real sample except an exact duplicate.
    real = torch.randn(50, 4, generator=_gen(16))
    fake = real[:1].repeat(20, 1)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(1 / 50)


def test_precision_recall_batching_and_cached_radii_agree():
    real = torch.randn(257, 8, generator=_gen(17))
    fake = torch.randn(199, 8, generator=_gen(18)) * 1.3 + 0.2
    ref = precision_recall(real, fake, k=3, batch_size=4096)
    assert precision_recall(real, fake, k=3, batch_size=7) == ref
    radii = knn_radii(real, k=3, batch_size=13)
    assert precision_recall(real, fake, k=3, real_radii=radii) == ref
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0


def test_precision_recall_2000_points_is_fast():
    real = torch.randn(2000, 64, generator=_gen(19))
    fake = torch.randn(2000, 64, generator=_gen(20))
    start = time.perf_counter()
    precision, recall = precision_recall(real, fake, k=3)
    elapsed = time.perf_counter() - start
    assert 0.5 < precision <= 1.0 and 0.5 < recall <= 1.0
    assert elapsed < 10.0  # ~0.3 s on two cores; loose bound against a quadratic-memory regression


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 5))
    with pytest.raises(ValueError, match="need at least 4 samples"):
        precision_recall(torch.randn(10, 3), torch.randn(3, 3), k=3)
    with pytest.raises(ValueError, match="need at least 4 samples"):
        precision_recall(torch.randn(2, 3), torch.randn(10, 3), k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_radii(torch.randn(10, 3), k=0)
    with pytest.raises(ValueError, match="real_radii"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 3), real_radii=torch.ones(9))


# --------------------------------------------------------------------------------------------------
# Accuracy and diversity
# --------------------------------------------------------------------------------------------------


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 0, 0])
    assert class_accuracy(logits, labels) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        class_accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="integer class labels"):
        class_accuracy(logits, labels.float())
    with pytest.raises(ValueError, match="logits"):
        class_accuracy(torch.randn(4), labels)


def test_diversity_hand_example_and_identical_samples():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 is a singleton and is skipped
    expected = (5.0 + (1.0 + 1.0 + math.sqrt(2.0)) / 3.0) / 2.0
    assert within_class_diversity(feats, labels) == pytest.approx(expected)
    same = torch.randn(1, 7, generator=_gen(21)).repeat(12, 1)
    assert within_class_diversity(same, torch.arange(12) % 3) == 0.0
    assert math.isnan(within_class_diversity(torch.randn(3, 2), torch.tensor([0, 1, 2])))


# --------------------------------------------------------------------------------------------------
# One-call evaluation
# --------------------------------------------------------------------------------------------------

KEYS = {"fd", "precision", "recall", "accuracy", "diversity", "diversity_ratio"}


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent 8×8 'images': class c lights up row c, plus noise."""
    labels = torch.arange(n) % 8
    images = 0.1 * torch.rand(n, 1, 8, 8, generator=_gen(seed))
    images[torch.arange(n), 0, labels] += 0.8
    return images, labels


def _features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def _logits(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].sum(dim=2)  # row sums: arg-max is the lit row = the class


def test_evaluate_samples_real_against_itself():
    images, labels = _toy_data(200, seed=22)
    out = evaluate_samples(images, labels, _features, _logits, real_images=images, real_labels=labels)
    assert set(out) == KEYS
    assert out["fd"] == pytest.approx(0.0, abs=1e-9)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["accuracy"] == 1.0
    assert out["diversity_ratio"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in out.values())


def test_evaluate_samples_reference_path_matches_and_detects_collapse():
    real, real_labels = _toy_data(240, seed=23)
    gen, gen_labels = _toy_data(160, seed=24)
    ref = RealReference.from_images(real, real_labels, _features, k=3, batch_size=50)
    direct = evaluate_samples(gen, gen_labels, _features, _logits, real_images=real, real_labels=real_labels)
    cached = evaluate_samples(gen, gen_labels, _features, _logits, reference=ref, batch_size=33)
    assert direct == pytest.approx(cached)
    # Mode collapse: one image per class repeated -> diversity 0, recall drops, precision stays high.
    collapsed = gen[:8].repeat(20, 1, 1, 1)
    out = evaluate_samples(collapsed, gen_labels[:8].repeat(20), _features, _logits, reference=ref)
    assert out["diversity"] == 0.0 and out["diversity_ratio"] == 0.0
    assert out["recall"] < 0.2 < direct["recall"]
    assert out["fd"] > direct["fd"]


def test_evaluate_features_without_logits_gives_nan_accuracy():
    real, labels = _toy_data(64, seed=25)
    ref = RealReference.from_features(_features(real), labels, k=3)
    out = evaluate_features(_features(real), labels, ref)
    assert set(out) == KEYS and math.isnan(out["accuracy"])


def test_evaluate_samples_errors():
    images, labels = _toy_data(32, seed=26)
    ref = RealReference.from_images(images, labels, _features)
    with pytest.raises(ValueError, match="give either"):
        evaluate_samples(images, labels, _features)
    with pytest.raises(ValueError, match="not both"):
        evaluate_samples(images, labels, _features, real_images=images, real_labels=labels, reference=ref)
    with pytest.raises(ValueError, match="k=5 differs"):
        evaluate_samples(images, labels, _features, reference=ref, k=5)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        evaluate_samples(images, labels, lambda x: x.flatten(1)[:, :10], reference=ref)
    with pytest.raises(ValueError, match="returned shape"):
        compute_features(images, lambda x: x.flatten(1)[:3])
    with pytest.raises(ValueError, match=r"labels: expected shape \(32,\)"):
        evaluate_samples(images, labels[:5], _features, reference=ref)


# --------------------------------------------------------------------------------------------------
# Kernel MMD² (CMMD recipe)
# --------------------------------------------------------------------------------------------------


def _mmd_by_loops(a: torch.Tensor, b: torch.Tensor, sigma: float) -> float:
    """The unbiased MMD² written out pair by pair (the definition), on normalised rows."""
    a = [x / x.norm() for x in a.double()]
    b = [y / y.norm() for y in b.double()]

    def k(x, y):
        return math.exp(-float((x - y).square().sum()) / (2 * sigma**2))

    kaa = sum(k(x, y) for i, x in enumerate(a) for j, y in enumerate(a) if i != j) / (len(a) * (len(a) - 1))
    kbb = sum(k(x, y) for i, x in enumerate(b) for j, y in enumerate(b) if i != j) / (len(b) * (len(b) - 1))
    kab = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
    return kaa + kbb - 2 * kab


def test_mmd_matches_the_pairwise_definition_and_is_symmetric():
    a = torch.randn(7, 5, generator=_gen(1))
    b = torch.randn(9, 5, generator=_gen(2)) + 0.7
    for sigma in (0.5, 10.0):
        # σ = 10 on unit vectors: k ≈ 1 − d²/200, so MMD² ~1e-3 is a difference of numbers near 1
        # and float64 keeps ~13 of its digits, hence rel 1e-9 below.
        expected = _mmd_by_loops(a, b, sigma)
        assert mmd_rbf(a, b, sigma=sigma, scale=1.0) == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert mmd_rbf(a, b, sigma=sigma) == pytest.approx(1000 * expected, rel=1e-9, abs=1e-12)
        assert mmd_rbf(b, a, sigma=sigma, scale=1.0) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mmd_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    a = torch.randn(400, 8, generator=_gen(3)) + 2.0
    b = torch.randn(400, 8, generator=_gen(4)) + 2.0
    same = mmd_rbf(a, b, sigma=1.0)
    shifted = mmd_rbf(a, b + torch.linspace(0, 3, 8, dtype=b.dtype), sigma=1.0)
    # Unbiased: the same distribution gives ~0 (either sign) at any n, far below a real difference.
    assert abs(same) < 0.05 * shifted and shifted > 0


def test_mmd_errors():
    with pytest.raises(ValueError, match="sigma"):
        mmd_rbf(torch.randn(3, 2), torch.randn(3, 2), sigma=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        mmd_rbf(torch.randn(1, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="dimensions differ"):
        mmd_rbf(torch.randn(3, 2), torch.randn(3, 4))
