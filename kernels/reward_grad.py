"""Triton kernels of the reward-gradient combination op (docs/method.md §7).

Math (per sample b, all dimensions after the first flattened; float32, loads upcast immediately)::

    r   = g_reward with NaN/±Inf → 0          n_b = number of such entries
    a_b = ‖g_dmd‖₂,  r_b = ‖r‖₂,  d_b = ⟨g_dmd, r⟩
    cos = d_b / (a_b·r_b) if a_b·r_b > 0 else 0
    w_b = weight  (fixed)  |  min(max_weight, ratio·a_b / (r_b + eps))  (balanced)
    g   = g_dmd + w_b·r

Two launches, mirroring the CUDA kernel: ``_reward_grad_reduce_kernel`` (a (chunks, B) grid)
writes per-chunk partial sums (Σg_dmd², Σr², Σg_dmd·r, non-finite count);
``_reward_grad_fwd_kernel`` sums a sample's partials in a fixed order (deterministic), computes the
sample's statistics and weight (program 0 of the sample stores them) and writes ``g`` for its chunk.
In fixed mode the weight is known up front: the reduce kernel writes ``g`` (WRITE_G) and the second
launch, on a (1, B) grid, only finishes the statistics (COMBINE=False).
"""

import triton
import triton.language as tl


@triton.jit
def _sanitise(y):
    """(y with NaN/±Inf → 0, finite mask). |y| <= max fails for NaN and ±Inf."""
    finite = tl.abs(y) <= 3.4028234663852886e38
    return tl.where(finite, y, 0.0), finite


@triton.jit
def _saturate(g, out_max):
    """Clamp into a 16-bit output's finite range (out_max = +Inf for float32 outputs); comparisons
    rather than tl.minimum/maximum so that NaN is not turned into a bound."""
    g = tl.where(g > out_max, out_max, g)
    return tl.where(g < -out_max, -out_max, g)


@triton.jit
def _reward_grad_reduce_kernel(
    d_ptr,
    r_ptr,
    g_ptr,
    part_ptr,
    part_n_ptr,
    D,
    B,
    weight,
    out_max,
    WRITE_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    base = b.to(tl.int64) * D
    acc_dd = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_dr = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = idx < D
        x = tl.load(d_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(r_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        r, finite = _sanitise(y)  # masked lanes load 0: finite, contribute nothing
        acc_dd += x * x
        acc_rr += r * r
        acc_dr += x * r
        acc_n += tl.where(finite, 0, 1)
        if WRITE_G:
            g = _saturate(x + weight * r, out_max)
            tl.store(g_ptr + base + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
    j = b * nblk + pid
    tl.store(part_ptr + j, tl.sum(acc_dd, axis=0))
    tl.store(part_ptr + B * nblk + j, tl.sum(acc_rr, axis=0))
    tl.store(part_ptr + 2 * B * nblk + j, tl.sum(acc_dr, axis=0))
    tl.store(part_n_ptr + j, tl.sum(acc_n, axis=0))


@triton.jit
def _reward_grad_fwd_kernel(
    d_ptr,
    r_ptr,
    part_ptr,
    part_n_ptr,
    g_ptr,
    stats_ptr,
    nonfinite_ptr,
    D,
    B,
    nblk,
    weight,
    ratio,
    max_weight,
    eps,
    out_max,
    BALANCED: tl.constexpr,
    COMBINE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ITERS: tl.constexpr,
    NBLK_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    # Statistics of sample b: every program sums the same partials in the same order.
    k = tl.arange(0, NBLK_P2)
    kmask = k < nblk
    row = b * nblk + k
    sum_dd = tl.sum(tl.load(part_ptr + row, mask=kmask, other=0.0), axis=0)
    sum_rr = tl.sum(tl.load(part_ptr + B * nblk + row, mask=kmask, other=0.0), axis=0)
    sum_dr = tl.sum(tl.load(part_ptr + 2 * B * nblk + row, mask=kmask, other=0.0), axis=0)
    a = tl.sqrt_rn(sum_dd)
    rn = tl.sqrt_rn(sum_rr)
    ab = a * rn
    # Divide by 1 where a·b = 0 so that no 0/0 is evaluated in the branch tl.where discards.
    cosine = tl.where(ab > 0, tl.div_rn(sum_dr, tl.where(ab > 0, ab, 1.0)), 0.0)
    if BALANCED:
        w = tl.div_rn(ratio * a, rn + eps)
        w = tl.where(w > max_weight, max_weight, w)  # NaN stays NaN, as torch.clamp(max=) does
    else:
        w = weight
    if pid == 0:
        tl.store(stats_ptr + b, a)
        tl.store(stats_ptr + B + b, rn)
        tl.store(stats_ptr + 2 * B + b, cosine)
        tl.store(stats_ptr + 3 * B + b, w)
        n = tl.load(part_n_ptr + row, mask=kmask, other=0).to(tl.int64)
        tl.store(nonfinite_ptr + b, tl.sum(n, axis=0))

    if COMBINE:
        base = b.to(tl.int64) * D
        for it in range(ITERS):
            idx = (pid * ITERS + it) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            mask = idx < D
            x = tl.load(d_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(r_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            r, _ = _sanitise(y)
            g = _saturate(x + w * r, out_max)
            tl.store(g_ptr + base + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
