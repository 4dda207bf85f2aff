"""Triton kernel of the row-wise FP8 quantisation op (``dmdr_fast.ops.quantize_fp8``).

Math (per row r; float32 throughout, loads upcast immediately; ops/reference.py::quantize_fp8_ref)::

    amax  = max_k |x[r, k]| over finite entries (NaN, ±Inf count as 0)
    scale = max(min(amax, amax_ub), eps) / fp8_max          (IEEE division: tl.math.div_rn)
    q     = fp8(clamp(x · (1 / scale), ±fp8_max))           (NaN passes the clamp)

One program quantises BLOCK_M rows. With ONE_PASS the whole row is one tile, loaded once; else the
row is walked twice in BLOCK_K chunks (amax, then codes; the second read mostly hits L2). Plain
``/`` is an approximate division on NVIDIA GPUs and ``tl.minimum``/``tl.maximum`` do not define
their NaN result, so the kernel uses ``div_rn`` and comparisons + ``tl.where``, as the C++ kernels
do. ``HW_CAST`` selects the hardware conversion (GPU) or the integer encoder ``_fp8_bits`` (the
interpreter, whose fp8 casts are wrong: docs/architecture.md §6).
"""

import triton
import triton.language as tl


@triton.jit
def _finite_abs(x):
    a = tl.abs(x)
    return tl.where(a <= 3.4028234663852886e38, a, 0.0)


@triton.jit
def _fp8_bits(v, E4M3: tl.constexpr):
    """float32 (already in the finite fp8 range, or NaN) → fp8 code, round to nearest even; the
    algorithm of csrc/include/dmdr_fast/cpu_convert.h (fp8_e4m3_bits / fp8_e5m2_bits)."""
    u = v.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    ua = u & 0x7FFFFFFF
    a = ua.to(tl.float32, bitcast=True)
    if E4M3:
        sub = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
        nrm = ((ua + 0x7FFFF + ((ua >> 20) & 1)) >> 20) - (120 << 3)
        out = tl.where(ua < 0x3C800000, sub, nrm)
    else:
        sub = (a + 128.0).to(tl.uint32, bitcast=True) - 0x43000000
        nrm = ((ua + 0xFFFFF + ((ua >> 21) & 1)) >> 21) - (112 << 2)
        out = tl.where(ua < 0x38800000, sub, nrm)
    out = tl.where(ua > 0x7F800000, 0x7F, out)
    return (out | sign).to(tl.uint8)


@triton.jit
def _store_codes(q_ptr, offs, mask, x, inv, fp8_max, E4M3: tl.constexpr, HW_CAST: tl.constexpr):
    v = x * inv
    v = tl.where(v > fp8_max, fp8_max, v)
    v = tl.where(v < -fp8_max, -fp8_max, v)
    if HW_CAST:
        tl.store(q_ptr + offs, v.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(q_ptr + offs, _fp8_bits(v, E4M3), mask=mask)


@triton.jit
def quantize_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    eps,
    amax_ub,
    fp8_max,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
    E4M3: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    base = rows.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        offs = base[:, None] + cols[None, :]
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(_finite_abs(x), axis=1)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = base[:, None] + (k0 + cols)[None, :]
            mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
            xk = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.where(_finite_abs(xk) > acc, _finite_abs(xk), acc)
        amax = tl.max(acc, axis=1)
    amax = tl.where(amax > amax_ub, amax_ub, amax)
    amax = tl.where(amax < eps, eps, amax)
    scale = tl.math.div_rn(amax, tl.full([BLOCK_M], fp8_max, tl.float32))
    inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    if ONE_PASS:
        _store_codes(q_ptr, offs, mask, x, inv[:, None], fp8_max, E4M3, HW_CAST)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs = base[:, None] + (k0 + cols)[None, :]
            mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
            xk = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _store_codes(q_ptr, offs, mask, xk, inv[:, None], fp8_max, E4M3, HW_CAST)
