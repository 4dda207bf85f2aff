"""FP8 (e4m3) attention forward: ``dmdr_fast.ops.attention_fp8``.

Order of this file (Liger-style, docs/architecture.md §5): the quantisation helper → backend
implementations (float32 emulation, Triton launcher) → the backend table → the
``dmdr_fast::attention_fp8`` custom op with its fake → the public wrapper. The input record,
validation and Triton launch helpers are shared with :mod:`dmdr_fast.ops.attention`
(:mod:`dmdr_fast.ops._attention_common`).

FP8 is a separate, forward-only op rather than a flag of :func:`dmdr_fast.ops.attention`: it has
no backward, different backends and a different accuracy contract (SQNR, not the flash
tolerance rule).
"""

from __future__ import annotations

import math

import torch

from dmdr_fast._native import get_triton_kernels, triton_error
from dmdr_fast.backends import BackendImpl, OpBackends, select_backend
from dmdr_fast.ops._attention_common import (
    AttentionInputs,
    block_d,
    check_launch,
    head_dim_check,
    launch,
    mask_arg,
    rows_last,
    select_traced,
    static_head_dim,
    strides3,
    triton_size_check,
    validate,
)
from dmdr_fast.ops._common import FUSED_DTYPES, OUT_MAX, cuda_capability_check, device_context
from dmdr_fast.ops.reference import _attention_probs

__all__ = [
    "BACKENDS",
    "FP8_DTYPE",
    "attention_fp8",
    "attention_fp8_torch",
    "fp8_block_d",
    "quantize_fp8_per_head",
]

OP = "attention_fp8"
Tensor = torch.Tensor
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = OUT_MAX[FP8_DTYPE]  # 448, the largest finite e4m3fn value
P_SCALE_FP8 = 256.0  # the kernels quantise 256·P (a power of two: exact) so small P avoid subnormals
# Triton's e4m3 tl.dot needs a reduction dimension of at least 32 (16-bit: 16), so head dims <= 16
# run in a 32-wide head-dim tile: the extra columns load as 0 and are never stored (the result is
# the same). `dmdr-fast check-kernels` found it: BLOCK_D = 16 does not compile for sm_90.
FP8_MIN_BLOCK_D = 32


def fp8_block_d(D: int) -> int:
    """The head-dim tile of the FP8 forward for head dim ``D``."""
    return max(FP8_MIN_BLOCK_D, block_d(D))


def quantize_fp8_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(batch, head) symmetric e4m3 quantisation, done with torch (not Triton casts).

    ``descale = amax_{L, D}|x| / 448`` and ``x8 = saturate(x / descale)`` in ``torch.float8_e4m3fn``,
    so ``x ≈ x8.float() · descale`` (a head of zeros gets descale 1).

    Not :func:`dmdr_fast.ops.quantize_fp8` (row-wise): one scale per head over (L, D), a division
    by the scale rather than a multiply by its reciprocal, descale 1 for a zero head and NaN/Inf
    entries inside the amax, so calling it would change this op's numbers.

    Args:
        x: (B, H, L, D) floating tensor.

    Returns:
        ``(x8, descale)``: x8 (B, H, L, D) float8_e4m3fn, descale (B, H) float32.
    """
    amax = x.detach().abs().amax(dim=(-2, -1)).float()
    descale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    x8 = (x.detach().float() / descale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, descale


# ----------------------------------------------------------------------------- backends
# Each backend function takes an AttentionInputs and returns the output (B, H, Lq, D) in q's dtype.


def attention_fp8_torch(p: AttentionInputs) -> Tensor:
    """Emulation of the FP8 kernel's math in float32 (runs anywhere; the CPU path of ``attention_fp8``).

    q, k, v are quantised as by the kernel launcher; P = softmax of the dequantised scores is
    requantised as ``e4m3(256·P̃)/256`` with P̃ = exp(S − rowmax) before P·V. The kernel quantises
    P̃ relative to its *running* row max, so it matches this emulation up to the rounding of P.
    """
    (q8, sq), (k8, sk), (v8, sv) = (quantize_fp8_per_head(x) for x in (p.q, p.k, p.v))
    qd, kd, vd = (x8.float() * s[..., None, None] for x8, s in ((q8, sq), (k8, sk), (v8, sv)))
    probs = _attention_probs(qd, kd, p.key_padding_mask, p.scale, torch.float32)  # P = P̃ / l
    # P̃ = exp(S − rowmax) = P / rowmax(P) (its row max is 1), then l = rowsum(P̃) as in the kernel.
    pmax = probs.amax(dim=-1, keepdim=True)
    p_tilde = probs / torch.where(pmax > 0, pmax, 1.0)
    p_q = (p_tilde * P_SCALE_FP8).to(FP8_DTYPE).float() / P_SCALE_FP8
    l = p_tilde.sum(dim=-1, keepdim=True)
    out = (p_q @ vd) / torch.where(l > 0, l, 1.0)
    return out.to(p.q.dtype)


def attention_fp8_triton(p: AttentionInputs) -> Tensor:
    """FP8 flash forward: torch quantises q, k, v per head; the kernel takes the e4m3 tensors + scales."""
    kernels = get_triton_kernels("attention")
    check_launch(p.q, p.k, p.v)
    B, H, Lq, D = p.q.shape
    Lk = p.k.shape[2]
    device = p.q.device
    (q8, sq), (k8, sk), (v8, sv) = (quantize_fp8_per_head(x) for x in (p.q, p.k, p.v))
    q8, k8 = rows_last(q8), rows_last(k8)
    # V with the sequence innermost (row stride of Lk rounded up to 16 bytes): fp8 tensor-core
    # MMAs on Hopper want both operands K-major, and P·V contracts over the keys.
    lk_pad = -(-Lk // 16) * 16
    v8t = torch.empty(B, H, D, lk_pad, dtype=FP8_DTYPE, device=device)[..., :Lk]
    v8t.copy_(v8.transpose(-1, -2))
    v8 = v8t.transpose(-1, -2)
    descale = torch.stack([sq, sk, sv]).reshape(3, B * H).contiguous()
    out = torch.empty(B, H, Lq, D, dtype=p.q.dtype, device=device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=device)
    mask, stride_mb = mask_arg(p.key_padding_mask, lse)
    with device_context(device):
        launch(
            kernels.attention_fwd, "fwd", Lq, B * H, fp8_block_d(D), device,
            q8, k8, v8, out, lse, mask, descale,
            *strides3(q8), *strides3(k8), *strides3(v8), v8.stride(3), *strides3(out), stride_mb,
            H, Lq, Lk, D, p.scale * math.log2(math.e),
            HAS_MASK=p.key_padding_mask is not None, FP8=True, INPUT_PRECISION="tf32",
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- backend table


def _fp8_device_check(*, device: torch.device, **_: object) -> list[str]:
    if device.type != "cuda":
        return [
            "the Triton interpreter cannot run fp8 arithmetic (docs/architecture.md §6); "
            "backend='torch' emulates it"
        ]
    return []


BACKENDS: OpBackends = OpBackends.build(
    OP,
    (
        BackendImpl(
            "torch", attention_fp8_torch, frozenset({"cpu", "cuda"}), FUSED_DTYPES,
            note="float32 emulation of the FP8 kernel (torch quantisation, dequantised math)",
        ),
        BackendImpl(
            "triton", attention_fp8_triton, frozenset({"cpu", "cuda"}), FUSED_DTYPES, triton_error,
            input_checks=(_fp8_device_check, cuda_capability_check(8, 9), head_dim_check, triton_size_check),
            note="Triton flash forward on e4m3 tensor cores (sm_89+), per-head scales",
        ),
    ),
    {"cuda": ("triton", "torch"), "cpu": ("torch",)},
)  # fmt: skip


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("dmdr_fast::attention_fp8", mutates_args=())
def _attention_fp8_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> Tensor:
    out: Tensor = BACKENDS.impls[backend].fn(AttentionInputs(q, k, v, key_padding_mask, scale))
    return out.contiguous()


@_attention_fp8_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str) -> Tensor:
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- public API


def _select_traced(
    requested: str | None, device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool
) -> str:
    """:func:`dmdr_fast.ops._attention_common.select_traced` for this op (constants only)."""
    return select_traced(BACKENDS, requested, device_type, dtype, head_dim, has_mask)


# What ``torch.compiler.assume_constant_result`` does, without calling it (see select_traced).
_select_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def attention_fp8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """FP8 (e4m3) attention forward for no-grad score evaluations (docs/architecture.md §5).

    Same contract as :func:`dmdr_fast.ops.attention` (shapes, mask, scale, output dtype) but
    forward-only: q, k and v are quantised per (batch, head) with :func:`quantize_fp8_per_head`
    (torch), Q·Kᵀ and P·V run on e4m3 operands with float32 accumulation, and the output is
    returned in q's dtype. Expect ~25–30 dB SQNR against float32 attention on unit-scale inputs.

    Backends: ``"triton"`` (CUDA, compute capability >= 8.9) and ``"torch"`` (a float32
    emulation of the same quantisation, on any device; the automatic choice on CPU).

    Raises:
        ValueError: an input requires grad (there is no FP8 backward; use
            :func:`dmdr_fast.ops.attention`), or the errors of :func:`dmdr_fast.ops.attention`.
        BackendUnavailableError: the requested backend cannot run these inputs.
    """
    p = validate(OP, q, k, v, key_padding_mask, scale)
    for name, x in (("q", p.q), ("k", p.k), ("v", p.v)):
        if x.requires_grad:
            raise ValueError(
                f"{OP}: `{name}` requires grad, but the FP8 path is forward-only (no-grad score "
                "evaluations); call it under torch.no_grad() / on detached tensors, or use attention()"
            )
    if torch.compiler.is_compiling():
        name = _select_traced(
            backend, p.device.type, p.q.dtype, static_head_dim(p.q), p.key_padding_mask is not None
        )
        out: Tensor = _attention_fp8_op(*p, name)
        return out
    impl = select_backend(BACKENDS, backend, p.device.type, [p.q.dtype], **p.check_inputs())
    result: Tensor = impl.fn(p)
    return result
