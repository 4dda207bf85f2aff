"""Triton flash-attention kernels (non-causal, key padding mask, any lengths, head dim <= 256).

Math (one (batch, head); ``c = scale·log2(e)`` so that every exponential is an ``exp2``)::

    forward   S = c·Q·Kᵀ (masked keys: −inf)    m = rowmax(S)    P̃ = 2^(S − m)    l = rowsum(P̃)
              O = P̃·V / l                       LSE = ln 2 · (m + log2 l)       (natural log of
              Σ_j exp(scale·q·k_j); +inf for a row with no valid key, so that P recomputes to 0)
    backward  P = 2^(c·Q·Kᵀ − LSE·log2 e)   δ = rowsum(dO ∘ O)
              dV = Pᵀ·dO   dP = dO·Vᵀ   dS = P ∘ (dP − δ)   dQ = scale·dS·K   dK = scale·dSᵀ·Q

This is FlashAttention-2 (Dao, 2023, arXiv:2307.08691, Algorithms 1 and 2): the forward streams
K/V blocks through an online softmax (running max ``m``, running sum ``l``, rescaled accumulator),
so no Lq×Lk matrix is ever stored; the backward recomputes P from Q, K and the saved LSE.

Kernels (all over a (row blocks, B·H) grid, all accumulate in float32):

- ``_attention_fwd_kernel``: O and LSE. ``FP8=True`` is the no-grad FP8 (e4m3) variant: q, k, v
  arrive quantised with per-(batch, head) scales, Q·Kᵀ runs on fp8 operands and P is requantised
  to e4m3 (times 256, a power of two, so small probabilities stay out of e4m3's subnormals).
- ``_attention_bwd_preprocess_kernel``: δ = rowsum(dO ∘ O).
- ``_attention_bwd_dkdv_kernel``: one program per K/V block, looping over all query blocks.
- ``_attention_bwd_dq_kernel``: one program per Q block, looping over all key blocks.

dK/dV and dQ are separate kernels instead of FlashAttention-2's single pass with atomic adds into
an fp32 dQ: it recomputes Q·Kᵀ and dO·Vᵀ once more (7 instead of 5 block matmuls per (Q block,
K block) pair), but it is deterministic, needs no zeroed fp32 dQ buffer and no atomics traffic
(Lk/BLOCK_N read-modify-writes of every dQ tile), and each kernel can be autotuned on its own
(re-running a kernel while tuning has no side effects).

Ragged tails: loads beyond Lq / Lk / D are masked to 0; keys beyond Lk and padding keys get
S = −inf in the forward and P = 0 in the backward; query rows beyond Lq are never stored (their
LSE loads as +inf, so their P is 0 in the dK/dV loop). Operands of ``tl.dot`` stay in the input
dtype (bf16/fp16 tensor cores, fp32 accumulation); fp32 inputs use ``input_precision="ieee"``.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
P_SCALE_FP8: tl.constexpr = tl.constexpr(256.0)  # P·256 before the e4m3 cast (exact: a power of two)


@triton.jit
def _load_tile(ptr, offs_l, offs_d, stride_l, stride_d, L, D, EVEN_L: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; out-of-range rows / columns read as 0."""
    ptrs = ptr + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    if EVEN_L & EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    return x


@triton.jit
def _store_tile(ptr, x, offs_l, offs_d, stride_l, L, D, EVEN_L: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = ptr + offs_l[:, None] * stride_l + offs_d[None, :]
    if EVEN_L & EVEN_D:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D))


@triton.jit
def _key_valid(mask_ptr, offs_n, Lk, HAS_MASK: tl.constexpr):
    """True for keys that exist (< Lk) and are not padding (mask byte 0)."""
    valid = offs_n < Lk
    if HAS_MASK:
        pad = tl.load(mask_ptr + offs_n, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit
def _recompute_p(
    a, b, c, lse2, valid, MASK: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """Backward's P of one (query block, key block) pair from the saved LSE:
    ``2^(c·Q·Kᵀ − LSE·log2 e)``, 0 where ``valid`` is False (keys beyond Lk / padding) if MASK.

    ``lse2`` is LSE·log2 e per query. KEYS_ON_ROWS=False: a = Q, b = K, returns P [BLOCK_M, BLOCK_N];
    True: a = K, b = Q, returns Pᵀ [BLOCK_N, BLOCK_M].
    """
    s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION) * c
    if KEYS_ON_ROWS:
        p = tl.exp2(s - lse2[None, :])
        if MASK:
            p = tl.where(valid[:, None], p, 0.0)
    else:
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(valid[None, :], p, 0.0)
    return p


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, descale_ptr,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol,
    stride_mb,
    H, Lq, Lk, D, qk_scale,
    HAS_MASK: tl.constexpr,
    FP8: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK_N: tl.constexpr,
):  # fmt: skip
    """Online-softmax forward of one BLOCK_M block of queries of one (batch, head)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    o_ptr += b * stride_ob + h * stride_oh
    mask_ptr += b * stride_mb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    if FP8:  # per-(batch, head) dequantisation scales of q, k, v: (3, B·H) float32
        c = qk_scale * tl.load(descale_ptr + bh) * tl.load(descale_ptr + tl.num_programs(1) + bh)
    else:
        c = qk_scale
    q = _load_tile(q_ptr, offs_m, offs_d, stride_ql, 1, Lq, D, EVEN_M, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, stride_kl, 1, Lk, D, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * c
        if MASK_N:
            valid = _key_valid(mask_ptr, offs_n, Lk, HAS_MASK)
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = −inf: shift by 0 instead, so that
        # 2^(−inf − shift) = 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_ptr, offs_n, offs_d, stride_vl, stride_vd, Lk, D, EVEN_N, EVEN_D)
        if FP8:
            acc = tl.dot((p * P_SCALE_FP8).to(v.dtype), v, acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    if FP8:
        out = acc * (tl.load(descale_ptr + 2 * tl.num_programs(1) + bh) / P_SCALE_FP8) / l_safe[:, None]
    else:
        out = acc / l_safe[:, None]
    _store_tile(o_ptr, out.to(o_ptr.dtype.element_ty), offs_m, offs_d, stride_ol, Lq, D, EVEN_M, EVEN_D)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("inf"))
    lse_ptrs = lse_ptr + bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < Lq)


@triton.jit
def _attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_ol,
    stride_dob, stride_doh, stride_dol,
    H, Lq, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """δ = rowsum(dO ∘ O) in float32, (B·H, Lq)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, 1, Lq, D, False, False)
    do = _load_tile(
        do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dol, 1, Lq, D, False, False
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, mask_ptr,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_mb,
    H, Lq, Lk, D, scale,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """dK, dV of one BLOCK_N block of keys: Pᵀ recomputed per query block from Q, K and LSE."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    do_ptr += b * stride_dob + h * stride_doh
    lse_ptr += bh.to(tl.int64) * Lq
    delta_ptr += bh.to(tl.int64) * Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kl, 1, Lk, D, EVEN_N, EVEN_D)
    v = _load_tile(v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vl, 1, Lk, D, EVEN_N, EVEN_D)
    # padding keys get P = 0, so dK = dV = 0 (rows beyond Lk are computed but never stored)
    valid = _key_valid(mask_ptr + b * stride_mb, offs_n, Lk, HAS_MASK)
    c = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, offs_m, offs_d, stride_ql, 1, Lq, D, EVEN_M, EVEN_D)
        do = _load_tile(do_ptr, offs_m, offs_d, stride_dol, 1, Lq, D, EVEN_M, EVEN_D)
        if EVEN_M:
            lse2 = tl.load(lse_ptr + offs_m) * LOG2E
            delta = tl.load(delta_ptr + offs_m)
        else:  # rows beyond Lq: LSE = +inf gives P = 0
            lse2 = tl.load(lse_ptr + offs_m, mask=offs_m < Lq, other=float("inf")) * LOG2E
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < Lq, other=0.0)
        p_t = _recompute_p(k, q, c, lse2, valid, HAS_MASK, True, INPUT_PRECISION)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    dk = dk * scale
    dk_ptr += b * stride_dkb + h * stride_dkh
    dv_ptr += b * stride_dvb + h * stride_dvh
    _store_tile(dk_ptr, dk.to(dk_ptr.dtype.element_ty), offs_n, offs_d, stride_dkl, Lk, D, EVEN_N, EVEN_D)
    _store_tile(dv_ptr, dv.to(dv_ptr.dtype.element_ty), offs_n, offs_d, stride_dvl, Lk, D, EVEN_N, EVEN_D)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dqb, stride_dqh, stride_dql,
    stride_mb,
    H, Lq, Lk, D, scale,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one BLOCK_M block of queries: P recomputed per key block from Q, K and LSE."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    mask_ptr += b * stride_mb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, 1, Lq, D, EVEN_M, EVEN_D)
    do = _load_tile(
        do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dol, 1, Lq, D, EVEN_M, EVEN_D
    )
    row = bh.to(tl.int64) * Lq + offs_m
    lse2 = tl.load(lse_ptr + row, mask=offs_m < Lq, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row, mask=offs_m < Lq, other=0.0)
    c = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, stride_kl, 1, Lk, D, EVEN_N, EVEN_D)
        v = _load_tile(v_ptr, offs_n, offs_d, stride_vl, 1, Lk, D, EVEN_N, EVEN_D)
        # keys beyond Lk (read as 0) and padding keys; only applied (and kept) when MASK_N
        valid = _key_valid(mask_ptr, offs_n, Lk, HAS_MASK)
        p = _recompute_p(q, k, c, lse2, valid, MASK_N, False, INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq = dq * scale
    dq_ptr += b * stride_dqb + h * stride_dqh
    _store_tile(dq_ptr, dq.to(dq_ptr.dtype.element_ty), offs_m, offs_d, stride_dql, Lq, D, EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------- launch configuration


def _even_flags(args):
    return {
        "EVEN_M": args["Lq"] % args["BLOCK_M"] == 0,
        "EVEN_N": args["Lk"] % args["BLOCK_N"] == 0,
        "EVEN_D": args["D"] == args["BLOCK_D"],
    }


_flags = triton.heuristics({
    "EVEN_M": lambda a: _even_flags(a)["EVEN_M"],
    "EVEN_N": lambda a: _even_flags(a)["EVEN_N"],
    "EVEN_D": lambda a: _even_flags(a)["EVEN_D"],
})  # fmt: skip
_mask_n = triton.heuristics({"MASK_N": lambda a: bool(a["HAS_MASK"]) or a["Lk"] % a["BLOCK_N"] != 0})

attention_fwd = _mask_n(_flags(_attention_fwd_kernel))
attention_bwd_dkdv = _flags(_attention_bwd_dkdv_kernel)
attention_bwd_dq = _mask_n(_flags(_attention_bwd_dq_kernel))
attention_bwd_preprocess = _attention_bwd_preprocess_kernel


def _configs(kind: str, block_d: int) -> list:
    """Autotune candidates (GPU only) for head dims up to ``block_d``: tiles shrink as D grows so
    that the Q/K/V tiles and the fp32 accumulator fit in registers and shared memory."""
    if kind == "fwd":
        if block_d <= 64:
            shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
        elif block_d <= 128:
            shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
        else:
            shapes = [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]
    else:  # backward kernels hold two accumulators
        if block_d <= 64:
            shapes = [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 3)]
        elif block_d <= 128:
            shapes = [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)]
        else:
            shapes = [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 8, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_TUNED: dict = {}


def tuned(kernel, kind: str, block_d: int):
    """``kernel`` wrapped in ``triton.autotune`` over :func:`_configs`, keyed on (Lq, Lk, D, mask
    or not; Triton adds the tensors' dtypes)."""
    key = (id(kernel), kind, block_d)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(_configs(kind, block_d), key=["Lq", "Lk", "D", "HAS_MASK"])(kernel)
    return _TUNED[key]
