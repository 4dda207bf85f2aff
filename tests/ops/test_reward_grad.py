"""Tests of dmdr_fast.ops.reward_grad_combine: the reference against an independent numpy
derivation, every available backend against the reference, NaN/Inf sanitising, edge cases and
input validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.utils import assert_close_rel_to_torch

from dmdr_fast import backends
from dmdr_fast.ops import RewardGradStats, reward_grad_combine
from dmdr_fast.ops.reference import reward_grad_combine_ref
from dmdr_fast.ops.reward_grad import BACKENDS

OP = "reward_grad_combine"
CPU_BACKENDS = ["torch", "cpp", "triton"]
BATCHES = [1, 3, 5]
SAMPLE_SHAPES = [(1, 7, 13), (4, 16, 16), (16, 33, 17)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (mode, max_weight): the cap matters only in balanced mode; fixed mode must ignore it.
SETTINGS = [("fixed", math.inf), ("fixed", 0.1), ("balanced", math.inf), ("balanced", 2.0)]
WEIGHT, RATIO = 0.7, 0.5
# The Triton interpreter takes ~0.1-1 s per call: a subset of the grid (every shape, B = 1 and 3).
TRITON_CASES = {(1, s) for s in SAMPLE_SHAPES} | {(3, SAMPLE_SHAPES[1])}


def _available(backend: str, dtype=torch.float32) -> list[str]:
    impl = BACKENDS.impls[backend]
    return impl.not_supported_reasons("cpu", [dtype], device=torch.device("cpu"))


def _skip_unless(backend: str, dtype=torch.float32) -> None:
    reasons = _available(backend, dtype)
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")


def make_inputs(shape, dtype=torch.float32, seed=0, dtype_reward=None):
    """g_dmd ~ N(0, 1); g_reward partly aligned with it, with a per-sample scale spanning 4^B so
    that the balanced weights differ across samples (some above a cap of 2, some below)."""
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]
    d = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = (0.05 * 4.0 ** torch.arange(B, dtype=torch.float64)).view(-1, *[1] * (len(shape) - 1))
    r = scale * (noise + 0.3 * d)
    return d.to(dtype), r.to(dtype_reward or dtype)


def poison(g_reward: torch.Tensor) -> dict[int, int]:
    """Put NaN, +Inf and −Inf into g_reward (in place); returns the expected count per sample."""
    flat = g_reward.view(g_reward.shape[0], -1)
    D = flat.shape[1]
    flat[0, 0] = float("nan")
    counts = {0: 1}
    if flat.shape[0] > 1:
        flat[1, D // 2] = float("inf")
        flat[1, D - 1] = float("-inf")
        flat[1, 1 % D] = float("nan")
        counts[1] = len({D // 2, D - 1, 1 % D})
    if flat.shape[0] > 2:
        flat[2, :] = float("inf")  # a whole sample: r = 0
        counts[2] = D
    return counts


def numpy_reward(g_dmd, g_reward, mode, weight, ratio, max_weight, eps):
    """Independent float64 derivation, per sample with numpy."""
    d = g_dmd.double().numpy().reshape(g_dmd.shape[0], -1)
    r_in = g_reward.double().numpy().reshape(d.shape)
    g = np.empty_like(d)
    stats = {k: np.empty(d.shape[0]) for k in ("dmd_norm", "reward_norm", "cosine", "weight")}
    nonfinite = np.empty(d.shape[0], dtype=np.int64)
    for i in range(d.shape[0]):
        ok = np.isfinite(r_in[i])
        r = np.where(ok, r_in[i], 0.0)
        a, b = np.linalg.norm(d[i]), np.linalg.norm(r)
        cos = float(np.dot(d[i], r) / (a * b)) if a * b > 0 else 0.0
        w = weight if mode == "fixed" else min(max_weight, ratio * a / (b + eps))
        g[i] = d[i] + w * r
        stats["dmd_norm"][i], stats["reward_norm"][i], stats["cosine"][i], stats["weight"][i] = a, b, cos, w
        nonfinite[i] = int((~ok).sum())
    return g.reshape(g_dmd.shape), stats, nonfinite


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 4, 16, 16), (5, 16, 33, 17)])
@pytest.mark.parametrize("mode,max_weight", SETTINGS)
def test_reference_matches_independent_float64(shape, mode, max_weight):
    d, r = make_inputs(shape, torch.float64)
    counts = poison(r)
    g, stats = reward_grad_combine_ref(d, r, mode, WEIGHT, RATIO, max_weight, 1e-12)
    g_np, stats_np, n_np = numpy_reward(d, r, mode, WEIGHT, RATIO, max_weight, 1e-12)
    assert isinstance(stats, RewardGradStats)
    assert g.dtype == torch.float64 and stats.cosine.dtype == torch.float64
    np.testing.assert_allclose(g.numpy(), g_np, rtol=1e-12, atol=1e-12)
    for k, v in stats_np.items():
        np.testing.assert_allclose(getattr(stats, k).numpy(), v, rtol=1e-12, atol=1e-14, err_msg=k)
    assert stats.nonfinite.dtype == torch.int64
    np.testing.assert_array_equal(stats.nonfinite.numpy(), n_np)
    assert all(stats.nonfinite[i].item() == c for i, c in counts.items())


# ----------------------------------------------------------------------------- backends vs reference


def _compare(backend, d, r, mode, max_weight, eps=1e-12):
    """Run the op and check it against the float64 reference with the flash-attention rule."""
    dtype = d.dtype
    g, stats = reward_grad_combine(
        d, r, mode=mode, weight=WEIGHT, ratio=RATIO, max_weight=max_weight, eps=eps, backend=backend
    )
    assert g.dtype == dtype and g.shape == d.shape
    assert all(s.dtype == torch.float32 and s.shape == (d.shape[0],) for s in stats[:4])
    assert stats.nonfinite.dtype == torch.int64

    args = (mode, WEIGHT, RATIO, max_weight, eps)
    ref_g, ref = reward_grad_combine_ref(d.double(), r.double(), *args)
    pt_g, pt = reward_grad_combine_ref(d, r, *args, upcast=False)
    # fp32 arithmetic has ~1e-7 relative error; atol covers rounding that PyTorch happened to avoid.
    atol = 4 * torch.finfo(dtype).eps * ref_g.abs().max().item()
    assert_close_rel_to_torch(g, ref_g, pt_g, atol=atol, name=f"{backend} g")
    for k in ("dmd_norm", "reward_norm", "cosine", "weight"):
        ref_k = getattr(ref, k)
        # The statistics are float32 whatever the input dtype: ~1e-7 relative at worst.
        tol = 1e-6 * ref_k.abs().max().item() + 1e-12
        assert_close_rel_to_torch(getattr(stats, k), ref_k, getattr(pt, k), atol=tol, name=f"{backend} {k}")
    assert torch.equal(stats.nonfinite, ref.nonfinite)
    return g, stats


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,max_weight", SETTINGS)
def test_backend_matches_reference(backend, B, sample_shape, dtype, mode, max_weight):
    if backend == "triton" and (
        dtype != torch.float32 or (B, sample_shape) not in TRITON_CASES or (mode, max_weight) == SETTINGS[1]
    ):
        pytest.skip("Triton interpreter: fp32 only (docs/architecture.md §6), and few cases (it is slow)")
    _skip_unless(backend, dtype)
    d, r = make_inputs((B, *sample_shape), dtype)
    _compare(backend, d, r, mode, max_weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_backend_is_accurate(backend):
    """Beyond the relative rule: fused fp32 kernels agree with the float64 reference to ~1e-6."""
    _skip_unless(backend)
    d, r = make_inputs((3, 4, 16, 16))
    g, stats = reward_grad_combine(d, r, mode="balanced", ratio=RATIO, max_weight=2.0, backend=backend)
    ref_g, ref = reward_grad_combine_ref(d.double(), r.double(), "balanced", 1.0, RATIO, 2.0)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-6 * ref_g.abs().max().item())
    for k in ("dmd_norm", "reward_norm", "cosine", "weight"):
        torch.testing.assert_close(getattr(stats, k).double(), getattr(ref, k), rtol=2e-6, atol=1e-9)


def test_cpp_does_not_depend_on_thread_count():
    _skip_unless("cpp")
    d, r = make_inputs((3, 16, 64, 64))  # large enough for the kernel to use several threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1, s1 = reward_grad_combine(d, r, mode="balanced", backend="cpp")
        torch.set_num_threads(2)
        g2, s2 = reward_grad_combine(d, r, mode="balanced", backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


# ----------------------------------------------------------------------------- NaN / Inf and edge cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fixed", "balanced"])
def test_nonfinite_reward_entries_are_zeroed_and_counted(backend, dtype, mode):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only")
    _skip_unless(backend, dtype)
    d, r = make_inputs((4, 3, 8, 8), dtype)
    counts = poison(r)
    g, stats = _compare(backend, d, r, mode, 2.0)
    assert torch.isfinite(g).all()
    assert stats.nonfinite.tolist() == [counts.get(i, 0) for i in range(4)]
    bad = ~torch.isfinite(r)
    assert torch.equal(g[bad], d[bad])  # g = g_dmd + w·0 exactly where the reward was not finite
    assert stats.reward_norm[2] == 0 and stats.cosine[2] == 0  # sample 2 is all Inf: r = 0
    assert torch.equal(g[2], d[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("max_weight", [math.inf, 3.0])
def test_zero_reward_and_zero_dmd(backend, max_weight):
    """r = 0: cosine 0, balanced weight min(cap, ratio·a/eps), g = g_dmd. g_dmd = 0: cosine 0, w = 0."""
    _skip_unless(backend)
    d, r = make_inputs((3, 2, 5, 7))
    r[0] = 0.0
    d[1] = 0.0
    eps = 1e-6
    g, stats = reward_grad_combine(
        d, r, mode="balanced", ratio=RATIO, max_weight=max_weight, eps=eps, backend=backend
    )
    a0 = d[0].double().norm().item()
    assert stats.reward_norm[0] == 0 and stats.cosine[0] == 0
    assert stats.weight[0].item() == pytest.approx(min(max_weight, RATIO * a0 / eps), rel=1e-6)
    assert torch.equal(g[0], d[0])
    assert stats.dmd_norm[1] == 0 and stats.cosine[1] == 0 and stats.weight[1] == 0
    assert torch.equal(g[1], torch.zeros_like(g[1]))
    g_f, stats_f = reward_grad_combine(d, r, mode="fixed", weight=2.5, backend=backend)
    assert torch.equal(g_f[0], d[0]) and stats_f.cosine[0] == 0 and stats_f.weight.tolist() == [2.5] * 3


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_output_saturates(backend, dtype):
    """g beyond the output dtype's range is stored as its largest finite value, never ±Inf."""
    _skip_unless(backend, dtype)
    d = torch.ones(2, 8, dtype=dtype)
    r = torch.tensor([1.0, -1.0] * 8).view(2, 8).to(dtype)
    big = 1e5 if dtype == torch.float16 else 3.4e38  # 3.4e38 rounds to Inf in bf16, fits in fp32
    g, _ = reward_grad_combine(d, r, weight=big, backend=backend)
    fmax = torch.finfo(dtype).max
    assert torch.isfinite(g).all()
    assert (g.abs() == fmax).all()
    assert torch.equal(torch.sign(g), torch.sign(r))


def test_mixed_dtypes():
    """Compute dtype = promotion; g comes back in g_dmd's dtype; float64 → torch backend, float64 stats."""
    for dt_d, dt_r in [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ]:
        d, r = make_inputs((3, 2, 9, 11), dt_d, dtype_reward=dt_r)
        ref_g, ref = reward_grad_combine(d, r, mode="balanced", backend="torch")
        assert ref_g.dtype == dt_d and ref.cosine.dtype == torch.float32
        for backend in ["cpp", "triton"]:
            if _available(backend, dt_d) or (backend == "triton" and dt_d != torch.float32):
                continue
            g, stats = reward_grad_combine(d, r, mode="balanced", backend=backend)
            assert g.dtype == dt_d
            # Same float32 math up to FMA contraction and summation order: ≤ 1 ulp of g's dtype.
            eps = torch.finfo(dt_d).eps
            torch.testing.assert_close(g, ref_g, rtol=eps, atol=2 * eps * ref_g.abs().max().item())
            for a, b in zip(stats, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    d, r = make_inputs((2, 3, 4), torch.float32, dtype_reward=torch.float64)
    g, stats = reward_grad_combine(d, r, mode="balanced")  # automatic choice: torch
    assert g.dtype == torch.float32 and stats.weight.dtype == torch.float64
    with pytest.raises(backends.BackendUnavailableError, match="float64 not supported"):
        reward_grad_combine(d, r, backend="cpp")


def test_noncontiguous_inputs_work():
    d, r = make_inputs((3, 8, 6, 5))
    nd, nr = (a.transpose(-1, -2).contiguous().transpose(-1, -2) for a in (d, r))
    assert not nd.is_contiguous()
    for backend in CPU_BACKENDS:
        if _available(backend):
            continue
        g, s = reward_grad_combine(d, r, mode="balanced", backend=backend)
        gn, sn = reward_grad_combine(nd, nr, mode="balanced", backend=backend)
        torch.testing.assert_close(gn, g)
        for a, b in zip(sn, s):
            torch.testing.assert_close(a, b)


def test_inputs_are_detached():
    d, r = make_inputs((2, 3, 4))
    d.requires_grad_(True)
    r.requires_grad_(True)
    for backend in ["torch", "cpp"]:
        if _available(backend):
            continue
        g, stats = reward_grad_combine(d, r, backend=backend)
        assert not g.requires_grad and not any(s.requires_grad for s in stats)


# ----------------------------------------------------------------------------- validation


def _ok():
    return make_inputs((2, 3, 4, 4))


@pytest.mark.parametrize(
    "d,r,match,exc",
    [
        (
            torch.zeros(2, 3),
            torch.zeros(2, 4),
            r"`g_reward` must have the shape of `g_dmd` \(2, 3\)",
            ValueError,
        ),
        (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3), "`g_dmd` must be float", TypeError),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.complex64), "`g_reward`.*complex", TypeError),
        (torch.zeros(2, 3), [[0.0] * 3] * 2, "`g_reward` must be a torch.Tensor", TypeError),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), "same device.*g_reward on meta", ValueError),
        (torch.zeros(0, 3), torch.zeros(0, 3), "empty batch", ValueError),
        (torch.zeros(()), torch.zeros(()), "empty batch", ValueError),
        (torch.zeros(2, 0), torch.zeros(2, 0), "no elements per sample", ValueError),
    ],
)
def test_bad_tensors_name_the_argument(d, r, match, exc):
    with pytest.raises(exc, match=match):
        reward_grad_combine(d, r)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "auto"}, "`mode` must be 'fixed' or 'balanced', got 'auto'"),
        ({"mode": None}, "`mode` must be 'fixed' or 'balanced'"),
        ({"weight": float("nan")}, "`weight` must be a finite number"),
        ({"weight": math.inf}, "`weight` must be a finite number"),
        ({"weight": 1e39}, "`weight` must be a finite number"),
        ({"weight": "1"}, "`weight` must be a finite number"),
        ({"ratio": -0.5}, "`ratio` must be a finite number >= 0, got -0.5"),
        ({"ratio": math.inf}, "`ratio` must be a finite number >= 0"),
        ({"max_weight": -1.0}, "`max_weight` must be a number >= 0"),
        ({"max_weight": float("nan")}, "`max_weight` must be a number >= 0"),
        ({"eps": 0.0}, "`eps` must be a finite number > 0"),
        ({"eps": -1e-3}, "`eps` must be a finite number > 0"),
        ({"eps": 1e-50}, "`eps` must be a finite number > 0"),
        ({"eps": math.inf}, "`eps` must be a finite number > 0"),
    ],
)
def test_bad_scalars_name_the_argument(kwargs, match):
    d, r = _ok()
    with pytest.raises(ValueError, match=match):
        reward_grad_combine(d, r, **kwargs)


def test_scalar_edges_are_accepted():
    d, r = _ok()
    reward_grad_combine(d, r, mode="balanced", ratio=0, max_weight=0, eps=1e-30)
    reward_grad_combine(d, r, weight=-2, max_weight=math.inf)


def test_unknown_backend():
    d, r = _ok()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        reward_grad_combine(d, r, backend="nope")


# ----------------------------------------------------------------------------- benchmark


def test_bench_cli_json(tmp_path, capsys):
    from dmdr_fast.cli import main

    path = tmp_path / "b.json"
    rc = main(["bench", "reward-grad", "--shape", "3x2x5x7", "--providers", "eager,torch,cpp", "--reps", "2",
               "--warmup", "1", "--nonfinite", "3", "--max-weight", "0.5", "--json", str(path)])  # fmt: skip
    assert rc == 0
    result = json.loads(path.read_text())
    assert result["bytes_moved"] == 3 * 3 * 70 * 4
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["vs_eager"] == pytest.approx(1.0)
    assert rows["torch"]["max_abs_err"] < 1e-5
    assert rows["cpp"]["status"] == "ok" or rows["cpp"]["status"].startswith("unavailable")
    assert "copy ceiling" in capsys.readouterr().out


# ----------------------------------------------------------------------------- GPU (skipped without a device)


def _gpu_reasons(backend: str, dtype=torch.float32) -> list[str]:
    dev = torch.device("cuda")
    return BACKENDS.impls[backend].not_supported_reasons("cuda", [dtype], device=dev)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (5, 16, 33, 17), (8, 16, 128, 128), (3, 5, 7, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,max_weight", SETTINGS)
def test_gpu_backend_matches_reference(backend, shape, dtype, mode, max_weight):
    reasons = _gpu_reasons(backend, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    d, r = (a.cuda() for a in make_inputs(shape, dtype))
    _compare(backend, d, r, mode, max_weight)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nonfinite_and_misaligned(backend, dtype):
    if _gpu_reasons(backend, dtype):
        pytest.skip(f"{backend} unavailable")
    d, r = (a.cuda() for a in make_inputs((4, 3, 8, 8), dtype))
    counts = poison(r)
    g, stats = _compare(backend, d, r, "balanced", 2.0)
    assert stats.nonfinite.tolist() == [counts.get(i, 0) for i in range(4)]
    assert torch.isfinite(g).all()
    # Offset views: pointers not 16-byte aligned → the scalar (VEC = 1) path; D = 77 is odd too.
    big = [torch.randn(3 * 77 + 1, device="cuda", dtype=dtype) for _ in range(2)]
    mis_d, mis_r = (b[1:].view(3, 7, 11) for b in big)
    _compare(backend, mis_d, mis_r, "balanced", math.inf)
    _compare(backend, mis_d, mis_r, "fixed", math.inf)
