"""Tests of dmdr_fast.ops.quantize_fp8: the reference against an independent rounding, every
available backend bit for bit against the reference, the defined NaN/Inf/zero-row behaviour, the
rounding boundaries of both formats, torch._scaled_mm compatibility and input validation.

Bit-exact means: q viewed as uint8 equals the reference's wherever the reference is not NaN, q is
NaN exactly where the reference is, and the scales are equal as float32 (NaN encodings may differ:
torch keeps the input's sign, cuda_fp8.h writes 0x7f).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdr_fast import backends
from dmdr_fast.ops import quantize_fp8
from dmdr_fast.ops._common import FP8_DTYPES, OUT_MAX
from dmdr_fast.ops.quantize_fp8 import BACKENDS
from dmdr_fast.ops.reference import quantize_fp8_ref

CPU_BACKENDS = ["torch", "cpp", "triton"]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd shapes: one element, a row shorter than a vector, K not a multiple of 8, a 1-D input, no
# rows, several leading dims, and rows longer than the interpreter's tile (Triton's two passes).
SHAPES = [(1, 1), (3, 7), (2, 3, 33), (17,), (0, 16), (5, 2, 1, 100), (4, 1031), (2, 4096)]
FP8_IDS = ["e4m3", "e5m2"]


def _available(backend: str, dtype=torch.float32) -> list[str]:
    return BACKENDS.impls[backend].not_supported_reasons("cpu", [dtype], device=torch.device("cpu"))


def _skip_unless(backend: str, dtype=torch.float32) -> None:
    reasons = _available(backend, dtype)
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")


def make_input(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Normal entries with a random power-of-two magnitude per row (2^-20 … 2^20), so that rows
    exercise very different scales, including subnormal fp8 codes for their small entries."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mag = 2.0 ** torch.randint(-20, 21, (*shape[:-1], 1), generator=gen).double()
    return (x * mag).to(dtype)


def assert_bit_exact(
    q: torch.Tensor, scale: torch.Tensor, ref_q: torch.Tensor, ref_scale: torch.Tensor
) -> None:
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape and scale.is_contiguous()
    nan, ref_nan = q.float().isnan(), ref_q.float().isnan()
    assert torch.equal(nan, ref_nan), "NaN positions differ"
    a, b = q.view(torch.uint8), ref_q.view(torch.uint8)
    bad = (a != b) & ~ref_nan
    assert not bad.any(), (
        f"{int(bad.sum())} codes differ, e.g. {a[bad][:5].tolist()} vs {b[bad][:5].tolist()} "
        f"(values {q.float()[bad][:5].tolist()} vs {ref_q.float()[bad][:5].tolist()})"
    )
    assert torch.equal(scale, ref_scale), (scale - ref_scale).abs().max()


# ----------------------------------------------------------------------------- the reference


def _fp8_table(fp8_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, codes) of every finite non-negative code, decoded from the bit layout by formula
    (independent of torch's casts)."""
    e_bits, m_bits, bias = (4, 3, 7) if fp8_dtype == torch.float8_e4m3fn else (5, 2, 15)
    values, codes = [], []
    for code in range(128):
        e, m = code >> m_bits, code & ((1 << m_bits) - 1)
        if fp8_dtype == torch.float8_e4m3fn and code == 0x7F:
            continue  # NaN (e4m3fn has no Inf)
        if fp8_dtype == torch.float8_e5m2 and e == (1 << e_bits) - 1:
            continue  # Inf and NaN
        v = m * 2.0 ** (1 - bias - m_bits) if e == 0 else (1 + m / 2**m_bits) * 2.0 ** (e - bias)
        values.append(v)
        codes.append(code)
    return np.array(values), np.array(codes)


def numpy_quantize(x: np.ndarray, fp8_dtype: torch.dtype, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The spec in numpy float32 with rounding to nearest even done by searching the decoded
    table in float64 (ties: the even code)."""
    fp8_max = np.float32(OUT_MAX[fp8_dtype])
    x = x.astype(np.float32)
    a = np.abs(x)
    amax = np.where(np.isfinite(a), a, np.float32(0)).max(axis=-1, keepdims=True)
    scale = np.maximum(amax, np.float32(eps)) / fp8_max
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.clip(x * (np.float32(1) / scale), -fp8_max, fp8_max).astype(np.float64)
    values, codes = _fp8_table(fp8_dtype)
    mag = np.abs(np.nan_to_num(v))
    hi = np.clip(np.searchsorted(values, mag), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = np.where(take_hi, values[hi], values[lo]) * np.sign(v)
    return np.where(np.isnan(v), np.nan, out), scale


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_reference_matches_independent_rounding(fp8_dtype):
    x = make_input((64, 257), torch.float32)
    x[1] = 0.0
    x[2, 5], x[3, 7], x[4, :3] = math.nan, math.inf, -math.inf
    q, scale = quantize_fp8_ref(x, fp8_dtype)
    q_np, scale_np = numpy_quantize(x.numpy(), fp8_dtype, 1e-12)
    np.testing.assert_array_equal(scale.numpy(), scale_np)
    np.testing.assert_array_equal(q.float().numpy(), q_np.astype(np.float32))


def test_fp8_limits_are_torchs():
    for dt in FP8_DTYPES:
        assert OUT_MAX[dt] == torch.finfo(dt).max


# ----------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_backend_is_bit_exact(backend, shape, dtype, fp8_dtype):
    _skip_unless(backend, dtype)
    x = make_input(shape, dtype)
    q, scale = quantize_fp8(x, fp8_dtype, backend=backend)
    assert_bit_exact(q, scale, *quantize_fp8_ref(x, fp8_dtype))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_rounding_boundaries(backend, fp8_dtype):
    """Every rounding decision of the encoders: rows whose amax is fp8_max (so scale = 1 exactly
    and the scaled values are the inputs) holding every finite code, every midpoint between
    neighbours (ties to even), the float32 values next to each midpoint, and 2^16 random values."""
    _skip_unless(backend)
    fp8_max = OUT_MAX[fp8_dtype]
    values = torch.tensor(_fp8_table(fp8_dtype)[0], dtype=torch.float32)
    mids = (values[1:] + values[:-1]) / 2  # exact in float32
    near = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    rand = (torch.rand(1 << 16, generator=torch.Generator().manual_seed(1)) * 2 - 1) * fp8_max
    tiny = torch.tensor([1e-30, 1.1754944e-38, 1e-45, 0.0])  # float32 subnormals and zero → 0
    pos = torch.cat([values, mids, near, tiny])
    vals = torch.cat([pos, -pos, rand])
    K = 256
    vals = torch.cat([vals, torch.zeros((-len(vals)) % (K - 1))]).view(-1, K - 1)
    x = torch.cat([torch.full((vals.shape[0], 1), fp8_max), vals], dim=1)
    q, scale = quantize_fp8(x, fp8_dtype, backend=backend)
    assert torch.equal(scale, torch.ones_like(scale))
    ref = x.to(fp8_dtype)  # scale 1: the reference is torch's own cast of the inputs
    assert_bit_exact(q, scale, ref, torch.ones_like(scale))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_dequantisation_error_bound(backend, dtype, fp8_dtype):
    """x ≈ q·scale within half an fp8 ulp: 2^-(m+1) relative for normal codes, half the smallest
    subnormal step (times the scale) absolute; the row's amax entry lands on ±fp8_max."""
    _skip_unless(backend, dtype)
    x = make_input((32, 300), dtype, seed=2)
    q, scale = quantize_fp8(x, fp8_dtype, backend=backend)
    mbits, min_sub = (3, 2.0**-9) if fp8_dtype == torch.float8_e4m3fn else (2, 2.0**-16)
    xd, deq = x.double(), q.double() * scale.double()
    bound = 2.0 ** -(mbits + 1) * xd.abs() + 0.5 * min_sub * scale.double() * (1 + 1e-6)
    assert ((xd - deq).abs() <= bound).all()
    assert torch.equal(q.float().abs().amax(dim=-1), torch.full((32,), OUT_MAX[fp8_dtype]))


def test_noncontiguous_and_thread_count_independent():
    x = make_input((6, 40, 33), torch.float32).transpose(0, 1)
    assert not x.is_contiguous()
    ref = quantize_fp8_ref(x)
    for backend in CPU_BACKENDS:
        if _available(backend):
            continue
        assert_bit_exact(*quantize_fp8(x, backend=backend), *ref)
    if not _available("cpp"):
        big = make_input((512, 129), torch.bfloat16)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = quantize_fp8(big, backend="cpp")
            torch.set_num_threads(max(2, threads))
            many = quantize_fp8(big, backend="cpp")
        finally:
            torch.set_num_threads(threads)
        assert_bit_exact(*one, *many)


# ----------------------------------------------------------------------------- defined NaN / Inf / zeros


def _special_rows(dtype: torch.dtype) -> torch.Tensor:
    x = make_input((8, 19), torch.float32, seed=3)
    x[0] = 0.0  # all-zero row
    x[1, 4] = math.nan  # one NaN
    x[2, 0], x[2, 9] = math.inf, -math.inf  # ±Inf among finite entries
    x[3] = math.nan  # all NaN
    x[4] = math.inf  # all +Inf
    x[5, ::2] = -0.0  # signed zeros
    x[5, 1::2] = 0.0
    x[6, 3] = 1e30  # an outlier (amax_ub test)
    return x.to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_defined_nonfinite_and_zero_rows(backend, dtype, fp8_dtype):
    _skip_unless(backend, dtype)
    x = _special_rows(dtype)
    fp8_max = OUT_MAX[fp8_dtype]
    eps_scale = torch.tensor(1e-12, dtype=torch.float32) / fp8_max
    q, scale = quantize_fp8(x, fp8_dtype, backend=backend)
    assert_bit_exact(q, scale, *quantize_fp8_ref(x, fp8_dtype))
    qf = q.float()
    assert (qf[0] == 0).all() and scale[0, 0] == eps_scale  # zero row: q = 0, scale from eps
    assert qf[1, 4].isnan() and not qf[1].isnan()[torch.arange(19) != 4].any()
    # the NaN does not enter the amax: the rest of the row is quantised as without it
    clean = x[1:2].clone()
    clean[0, 4] = 0.0
    q_clean, s_clean = quantize_fp8(clean, fp8_dtype, backend=backend)
    assert scale[1, 0] == s_clean[0, 0]
    assert torch.equal(q[1:2].view(torch.uint8)[:, :4], q_clean.view(torch.uint8)[:, :4])
    # ±Inf saturate and leave the scale to the finite entries
    assert qf[2, 0] == fp8_max and qf[2, 9] == -fp8_max
    finite = x[2].float()[torch.isfinite(x[2].float())]
    assert scale[2, 0] == finite.abs().max() / torch.tensor(fp8_max)
    assert qf[3].isnan().all() and scale[3, 0] == eps_scale
    assert (qf[4] == fp8_max).all() and scale[4, 0] == eps_scale
    assert torch.equal(q[5].view(torch.uint8)[::2], torch.full((10,), 0x80, dtype=torch.uint8))
    assert (q[5].view(torch.uint8)[1::2] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_amax_upper_bound(backend, fp8_dtype):
    _skip_unless(backend)
    x = _special_rows(torch.float32)
    q, scale = quantize_fp8(x, fp8_dtype, amax_ub=10.0, backend=backend)
    assert_bit_exact(q, scale, *quantize_fp8_ref(x, fp8_dtype, amax_ub=10.0))
    assert scale[6, 0] == torch.tensor(10.0) / OUT_MAX[fp8_dtype]  # the outlier row is capped...
    assert q.float()[6, 3] == OUT_MAX[fp8_dtype]  # ...and its outlier saturates
    # rows whose finite amax is within the cap are quantised exactly as without it
    q_none, scale_none = quantize_fp8(x, fp8_dtype, backend=backend)
    a = x.abs()
    uncapped = torch.where(torch.isfinite(a), a, 0.0).amax(dim=-1) <= 10.0
    assert 0 < int(uncapped.sum()) < len(x)
    assert torch.equal(scale[uncapped], scale_none[uncapped])
    assert torch.equal(q.view(torch.uint8)[uncapped], q_none.view(torch.uint8)[uncapped])


def test_scales_feed_scaled_mm_rowwise():
    """(M, 1) activation scales and (N, 1) weight scales are torch._scaled_mm's row-wise
    scale_a / scale_b.t(): the product equals the dequantised matmul."""
    x, w = make_input((32, 64), seed=4), make_input((48, 64), seed=5)
    qa, sa = quantize_fp8(x)
    qb, sb = quantize_fp8(w)
    try:
        out = torch._scaled_mm(qa, qb.t(), sa, sb.t(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm unavailable here: {exc}")
    deq = (qa.double() * sa.double()) @ (qb.double() * sb.double()).t()
    torch.testing.assert_close(out.double(), deq, rtol=1e-5, atol=1e-6 * deq.abs().max().item())


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"x": torch.zeros(3, 4, dtype=torch.int32)}, TypeError, "`x` must be float"),
        ({"x": torch.zeros(3, 4, dtype=torch.complex64)}, TypeError, "`x`.*complex"),
        ({"x": [1.0]}, TypeError, "`x` must be a torch.Tensor"),
        ({"x": torch.tensor(1.0)}, ValueError, r"`x` must have shape \(\.\.\., K\)"),
        ({"x": torch.zeros(3, 0)}, ValueError, r"K >= 1, got \(3, 0\)"),
        ({"fp8_dtype": torch.float16}, TypeError, "`fp8_dtype` must be"),
        ({"fp8_dtype": torch.float8_e4m3fnuz}, TypeError, "`fp8_dtype` must be"),
        ({"eps": 0.0}, ValueError, "`eps` must be a finite number >="),
        ({"eps": 1e-40}, ValueError, "`eps` must be"),
        ({"eps": math.nan}, ValueError, "`eps` must be"),
        ({"eps": True}, ValueError, "`eps` must be"),
        ({"amax_ub": 0.0}, ValueError, "`amax_ub` must be None or a number > 0"),
        ({"amax_ub": math.nan}, ValueError, "`amax_ub`"),
        ({"x": torch.ones(2, 3, requires_grad=True)}, ValueError, "`x` requires grad"),
    ],
)
def test_bad_input_errors_name_the_argument(kwargs, exc, match):
    args = {"x": torch.ones(2, 3), "fp8_dtype": torch.float8_e4m3fn, **kwargs}
    x, fp8_dtype = args.pop("x"), args.pop("fp8_dtype")
    with pytest.raises(exc, match=match):
        quantize_fp8(x, fp8_dtype, **args)


def test_requires_grad_is_fine_without_grad_mode():
    x = make_input((2, 5)).requires_grad_(True)
    with torch.no_grad():
        q, scale = quantize_fp8(x)
    assert not q.requires_grad and not scale.requires_grad
    assert_bit_exact(q, scale, *quantize_fp8_ref(x.detach()))


def test_float64_goes_to_reference_automatically_and_is_refused_by_fused():
    x = make_input((3, 9), torch.float64)
    q, scale = quantize_fp8(x)
    assert_bit_exact(q, scale, *quantize_fp8_ref(x.float()))  # float64 is rounded to float32 first
    if not _available("cpp", torch.float64):
        pytest.fail("cpp should refuse float64")
    with pytest.raises(backends.BackendUnavailableError, match="float64 not supported"):
        quantize_fp8(x, backend="cpp")


# ----------------------------------------------------------------------------- GPU (skipped without a device)

GPU_SHAPES = [*SHAPES, (4096, 4096), (8, 8192), (3, 16385), (1, 1 << 20), (70000, 8), (5, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_gpu_backend_is_bit_exact(backend, shape, dtype, fp8_dtype):
    dev = torch.device("cuda")
    reasons = BACKENDS.impls[backend].not_supported_reasons("cuda", [dtype], device=dev)
    if reasons:
        pytest.skip("; ".join(reasons))
    x = make_input(shape, dtype).to(dev)
    q, scale = quantize_fp8(x, fp8_dtype, backend=backend)
    ref_q, ref_scale = quantize_fp8_ref(x.cpu(), fp8_dtype)  # the CPU reference: one oracle
    assert_bit_exact(q.cpu(), scale.cpu(), ref_q, ref_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_gpu_special_values_boundaries_and_misaligned(backend, fp8_dtype):
    dev = torch.device("cuda")
    if BACKENDS.impls[backend].not_supported_reasons("cuda", [torch.float32], device=dev):
        pytest.skip(f"{backend} unavailable")
    for dtype in INPUT_DTYPES:
        x = _special_rows(dtype)
        for ub in (None, 10.0):
            q, scale = quantize_fp8(x.to(dev), fp8_dtype, amax_ub=ub, backend=backend)
            ref = quantize_fp8_ref(x, fp8_dtype, amax_ub=math.inf if ub is None else ub)
            assert_bit_exact(q.cpu(), scale.cpu(), *ref)
    # Offset views: pointers not 16-byte aligned → the scalar (VEC = 1) path.
    big = make_input((3 * 64 * 8 + 1,), torch.bfloat16)
    mis = big[1:].view(3 * 8, 64).to(dev)[:, :]
    mis = torch.empty(mis.numel() + 1, dtype=mis.dtype, device=dev)[1:].view(mis.shape).copy_(mis)
    q, scale = quantize_fp8(mis, fp8_dtype, backend=backend)
    assert_bit_exact(q.cpu(), scale.cpu(), *quantize_fp8_ref(mis.cpu(), fp8_dtype))
    # The rounding boundaries on the hardware conversion.
    fp8_max = OUT_MAX[fp8_dtype]
    values = torch.tensor(_fp8_table(fp8_dtype)[0], dtype=torch.float32)
    mids = (values[1:] + values[:-1]) / 2
    pos = torch.cat([values, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    vals = torch.cat([pos, -pos])
    vals = torch.cat([vals, torch.zeros((-len(vals)) % 255)]).view(-1, 255)
    x = torch.cat([torch.full((vals.shape[0], 1), fp8_max), vals], dim=1)
    q, scale = quantize_fp8(x.to(dev), fp8_dtype, backend=backend)
    assert_bit_exact(q.cpu(), scale.cpu(), x.to(fp8_dtype), torch.ones(x.shape[0], 1))
