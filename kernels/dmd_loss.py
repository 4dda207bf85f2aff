"""Triton kernels of the fused DMD score-difference op (docs/method.md §5.4).

Math (per sample b, element i; float32 throughout, loads upcast immediately)::

    v_real  = v_uncond + w·(v_cond − v_uncond)      (v_cond without CFG)
    x̂0_real = x_t − t_b·v_real,   x̂0_fake = x_t − t_b·v_fake
    n_b     = Σ_i |x0 − x̂0_real| / D + eps
    g       = nan_to_num((x̂0_fake − x̂0_real) / n_b)

Two launches over a (chunks, B) grid, mirroring the CUDA kernel: ``_dmd_loss_reduce_kernel``
writes per-chunk partial sums of |x0 − x̂0_real|; ``_dmd_loss_fwd_kernel`` sums a sample's
partials in a fixed order (deterministic), writes ``g`` and per-chunk partial sums of g². The
launcher (``dmdr_fast.ops.dmd_loss.dmd_loss_fwd_triton``) reduces those to the loss.
"""

import triton
import triton.language as tl


@triton.jit
def _real_x0(x_t, t, v_cond, v_uncond, guidance, HAS_UNCOND: tl.constexpr):
    if HAS_UNCOND:
        v_real = v_uncond + guidance * (v_cond - v_uncond)
    else:
        v_real = v_cond
    return x_t - t * v_real


@triton.jit
def _dmd_loss_reduce_kernel(
    x0_ptr,
    xt_ptr,
    t_ptr,
    vc_ptr,
    vu_ptr,
    part_ptr,
    D,
    guidance,
    HAS_UNCOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    base = b.to(tl.int64) * D
    tb = tl.load(t_ptr + b)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = idx < D
        x0 = tl.load(x0_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            vu = tl.load(vu_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            vu = vc
        a = tl.abs(x0 - _real_x0(xt, tb, vc, vu, guidance, HAS_UNCOND))
        acc += tl.where(mask, a, 0.0)
    tl.store(part_ptr + b * nblk + pid, tl.sum(acc, axis=0))


@triton.jit
def _dmd_loss_fwd_kernel(
    xt_ptr,
    t_ptr,
    vf_ptr,
    vc_ptr,
    vu_ptr,
    part_a_ptr,
    part_s_ptr,
    g_ptr,
    norm_ptr,
    D,
    guidance,
    eps,
    out_max,
    HAS_UNCOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ITERS: tl.constexpr,
    NBLK_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    # Normaliser of sample b: every program sums the same partials in the same order.
    k = tl.arange(0, NBLK_P2)
    parts = tl.load(part_a_ptr + b * nblk + k, mask=k < nblk, other=0.0)
    norm = tl.sum(parts, axis=0) / D + eps
    if pid == 0:
        tl.store(norm_ptr + b, norm)

    base = b.to(tl.int64) * D
    tb = tl.load(t_ptr + b)
    f32_max = 3.4028234663852886e38
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = idx < D
        xt = tl.load(xt_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        vf = tl.load(vf_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            vu = tl.load(vu_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            vu = vc
        x0_real = _real_x0(xt, tb, vc, vu, guidance, HAS_UNCOND)
        x0_fake = xt - tb * vf
        g = (x0_fake - x0_real) / norm
        # nan_to_num: NaN → 0, ±Inf → ±float32 max (comparisons only; NaN != NaN).
        g = tl.where(g != g, 0.0, g)
        g = tl.minimum(tl.maximum(g, -f32_max), f32_max)
        g = tl.where(mask, g, 0.0)
        acc += g * g
        # Clamp into the output dtype's finite range so a 16-bit direction never holds ±Inf.
        g_out = tl.minimum(tl.maximum(g, -out_max), out_max)
        tl.store(g_ptr + base + idx, g_out.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_s_ptr + b * nblk + pid, tl.sum(acc, axis=0))
