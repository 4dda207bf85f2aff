"""Fused non-causal attention: ``dmdr_fast.ops.attention``.

Order of this file (Liger-style, docs/architecture.md §5): backend implementations (torch
reference, SDPA, xformers, Triton launchers) → the backend table → the ``dmdr_fast::attention``
custom ops with their fake and the one backward → ``AttentionFunction`` (the low-overhead eager
Triton path, same backward) → the public wrapper. The input record, validation and Triton launch
helpers live in :mod:`dmdr_fast.ops._attention_common` (shared with the FP8 forward,
:mod:`dmdr_fast.ops.attention_fp8`).

Which path runs:
- eager, ``torch`` / ``sdpa`` / ``xformers``: the backend is called directly and autograd flows
  through it natively (SDPA keeps its own memory-efficient backward);
- eager, ``triton``: :class:`AttentionFunction` (forward saves q, k, v, out and the (B, H, Lq)
  float32 log-sum-exp; backward recomputes P blockwise);
- under ``torch.compile`` (``fullgraph=True`` works): the backend is chosen once at trace time
  (:func:`_select_traced`); ``triton`` goes through the opaque custom op ``dmdr_fast::attention``
  (+ ``dmdr_fast::attention_backward``); the other backends are plain traceable PyTorch calls
  and stay visible to the compiler. The custom op accepts every backend name (``opcheck`` runs
  it on CPU); for non-Triton backends its backward is the closed-form reference backward
  (:func:`dmdr_fast.ops.reference.attention_bwd_ref`, which materialises P).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from dmdr_fast._native import get_triton_kernels, triton_error
from dmdr_fast.backends import BackendImpl, OpBackends, select_backend
from dmdr_fast.ops._attention_common import (
    INTERPRETER_BLOCKS,
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
from dmdr_fast.ops._common import FLOAT_DTYPES, FUSED_DTYPES, cuda_capability_check, device_context
from dmdr_fast.ops.reference import attention_bwd_ref, attention_ref

__all__ = ["BACKENDS", "AttentionFunction", "AttentionInputs", "attention"]

OP = "attention"
Tensor = torch.Tensor
PREPROCESS_BLOCK_M = 64  # rows per program of δ = rowsum(dO∘O) on a GPU (no autotuning: memory-bound)
_Grads = tuple[Tensor, Tensor, Tensor]


# ----------------------------------------------------------------------------- backends
# Each backend function takes an AttentionInputs and returns the output (B, H, Lq, D) in q's
# dtype, differentiable in q, k, v through ordinary autograd.


def attention_torch(p: AttentionInputs) -> Tensor:
    """Reference backend: :func:`dmdr_fast.ops.reference.attention_ref` (fp32, fp64 for fp64)."""
    return attention_ref(*p)


def attention_sdpa(p: AttentionInputs) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with our mask convention.

    SDPA's boolean ``attn_mask`` means True = attend, the opposite of a key padding mask. A
    batch element whose keys are all padding would give NaN rows; its mask is lifted (any finite
    attention) and its output multiplied by 0, which also zeroes its gradients.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if p.key_padding_mask is None:
        return sdpa(p.q, p.k, p.v, scale=p.scale)
    keep = ~p.key_padding_mask  # (B, Lk), True = attend
    empty = ~keep.any(dim=-1)  # (B,), every key is padding
    keep = keep | empty[:, None]
    out = sdpa(p.q, p.k, p.v, attn_mask=keep[:, None, None, :], scale=p.scale)
    return out * (~empty).to(out.dtype)[:, None, None, None]


@functools.cache
def _xformers_error() -> str:
    try:
        import xformers
        import xformers.ops
    except Exception as exc:  # not installed, or a broken install: never break dmdr_fast
        return f"xformers is not usable ({type(exc).__name__}: {exc}); `pip install xformers` built for this torch"
    if not getattr(xformers, "_has_cpp_library", True):
        return "xformers' compiled extension did not load against this torch build (see `python -m xformers.info`)"
    return ""


def _xformers_available(device_type: str) -> str:
    return _xformers_error()


def attention_xformers(p: AttentionInputs) -> Tensor:
    """``xformers.ops.memory_efficient_attention`` (layout (B, L, H, D); no mask support here)."""
    import xformers.ops

    out: Tensor = xformers.ops.memory_efficient_attention(
        p.q.transpose(1, 2), p.k.transpose(1, 2), p.v.transpose(1, 2), scale=p.scale
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- Triton launchers


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the user asked for fp32); 16-bit: tensor cores (the
    # "tf32" setting is Triton's default and only affects fp32 operands).
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd_triton(p: AttentionInputs) -> tuple[Tensor, Tensor]:
    """Flash forward: (out with q's shape, dtype and layout; (B, H, Lq) float32 natural-log LSE)."""
    kernels = get_triton_kernels("attention")
    q, k, v = rows_last(p.q), rows_last(p.k), rows_last(p.v)
    check_launch(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)  # keeps q's layout: a (B, L, H, D) view stays one after transposing back
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask, stride_mb = mask_arg(p.key_padding_mask, lse)
    with device_context(q.device):
        launch(
            kernels.attention_fwd, "fwd", Lq, B * H, block_d(D), q.device,
            q, k, v, out, lse, mask, lse,
            *strides3(q), *strides3(k), *strides3(v), 1, *strides3(out), stride_mb,
            H, Lq, Lk, D, p.scale * math.log2(math.e),
            HAS_MASK=p.key_padding_mask is not None, FP8=False, INPUT_PRECISION=_input_precision(q.dtype),
        )  # fmt: skip
    return out, lse


def attention_bwd_triton(p: AttentionInputs, grad_out: Tensor, out: Tensor, lse: Tensor) -> _Grads:
    """Flash backward: δ = rowsum(dO∘O), then dK/dV (per key block) and dQ (per query block)."""
    kernels = get_triton_kernels("attention")
    do = rows_last(grad_out.to(p.q.dtype))
    q, k, v, out = rows_last(p.q), rows_last(p.k), rows_last(p.v), rows_last(out)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    bd = block_d(D)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, stride_mb = mask_arg(p.key_padding_mask, lse)
    flags = {"HAS_MASK": p.key_padding_mask is not None, "INPUT_PRECISION": _input_precision(q.dtype)}
    import triton

    with device_context(q.device):
        block_m = PREPROCESS_BLOCK_M if q.device.type == "cuda" else INTERPRETER_BLOCKS[0]
        kernels.attention_bwd_preprocess[(triton.cdiv(Lq, block_m), B * H)](
            out, do, delta, *strides3(out), *strides3(do), H, Lq, D, BLOCK_M=block_m, BLOCK_D=bd
        )
        launch(
            kernels.attention_bwd_dkdv, "dkdv", Lk, B * H, bd, q.device,
            q, k, v, do, dk, dv, lse, delta, mask,
            *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(dk), *strides3(dv),
            stride_mb, H, Lq, Lk, D, p.scale, **flags,
        )  # fmt: skip
        launch(
            kernels.attention_bwd_dq, "dq", Lq, B * H, bd, q.device,
            q, k, v, do, dq, lse, delta, mask,
            *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(dq),
            stride_mb, H, Lq, Lk, D, p.scale, **flags,
        )  # fmt: skip
    return dq, dk, dv


def attention_triton(p: AttentionInputs) -> Tensor:
    """Triton flash attention, differentiable through :class:`AttentionFunction`."""
    out: Tensor = AttentionFunction.apply(*p, "triton")[0]
    return out


# ----------------------------------------------------------------------------- backend table


def _no_mask_check(*, has_mask: bool, **_: object) -> list[str]:
    if has_mask:
        return [
            "key_padding_mask is not supported (it would need a dense (B, H, Lq, Lk) bias); "
            "use the sdpa or triton backend"
        ]
    return []


BACKENDS: OpBackends = OpBackends.build(
    OP,
    (
        BackendImpl(
            "torch", attention_torch, frozenset({"cpu", "cuda"}), FLOAT_DTYPES,
            note="pure-PyTorch reference (the spec): explicit softmax in fp32, materialises Lq×Lk",
        ),
        BackendImpl(
            "sdpa", attention_sdpa, frozenset({"cpu", "cuda"}), FUSED_DTYPES,
            note="torch.nn.functional.scaled_dot_product_attention (flash / efficient / cuDNN / math)",
        ),
        BackendImpl(
            "xformers", attention_xformers, frozenset({"cuda"}), FUSED_DTYPES, _xformers_available,
            input_checks=(_no_mask_check,), note="xformers.ops.memory_efficient_attention (optional)",
        ),
        BackendImpl(
            "triton", attention_triton, frozenset({"cpu", "cuda"}), FUSED_DTYPES, triton_error,
            input_checks=(cuda_capability_check(8, 0), head_dim_check, triton_size_check),
            note="Triton flash attention fwd + bwd (CPU: interpreter only)",
        ),
    ),
    # Automatic choice. CUDA: SDPA before Triton until scripts/gpu_check.sh has validated our
    # kernels on a GPU and measured them against SDPA's best kernel (BENCHMARKS.md): no GPU has
    # run them yet.
    {"cuda": ("sdpa", "triton", "torch"), "cpu": ("sdpa", "torch")},
)  # fmt: skip


# ----------------------------------------------------------------------------- custom op + autograd


def _forward(p: AttentionInputs, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse): lse is the (B, H, Lq) float32 log-sum-exp for Triton, an empty tensor otherwise."""
    if backend == "triton":
        return attention_fwd_triton(p)
    out: Tensor = BACKENDS.impls[backend].fn(p)
    return out, p.q.new_empty((0,), dtype=torch.float32)


def _backward_kernels(p: AttentionInputs, grad_out: Tensor, out: Tensor, lse: Tensor, backend: str) -> _Grads:
    """(dq, dk, dv): Triton kernels, or the closed-form reference backward for other backends."""
    if backend == "triton":
        return attention_bwd_triton(p, grad_out, out, lse)
    return attention_bwd_ref(grad_out, *p)


@torch.library.custom_op("dmdr_fast::attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    out, lse = _forward(AttentionInputs(q, k, v, key_padding_mask, scale), backend)
    return out.contiguous(), lse


@_attention_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    lse_shape = (B, H, Lq) if backend == "triton" else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("dmdr_fast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    p = AttentionInputs(q, k, v, key_padding_mask, scale)
    dq, dk, dv = _backward_kernels(p, grad_out, out, lse, backend)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx: Any, p: AttentionInputs, out: Tensor, lse: Tensor, backend: str, opaque: bool) -> None:
    """What the backward needs: q, k, v, the mask, out and the LSE (no Lq×Lk tensor)."""
    ctx.save_for_backward(p.q, p.k, p.v, p.key_padding_mask, out, lse)
    ctx.scale, ctx.backend, ctx.opaque = p.scale, backend, opaque


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    """The one backward of the op, for the custom op and :class:`AttentionFunction` alike.

    Through the custom op (``ctx.opaque``, e.g. under ``torch.compile``) the kernels run inside
    the opaque ``dmdr_fast::attention_backward`` so that the compiler never traces them; eagerly
    (:class:`AttentionFunction`) they are launched directly.
    """
    q, k, v, mask, out, lse = ctx.saved_tensors
    if ctx.opaque:
        dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.backend)
    else:
        dq, dk, dv = _backward_kernels(
            AttentionInputs(q, k, v, mask, ctx.scale), grad_out, out, lse, ctx.backend
        )
    return dq, dk, dv, None, None, None


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, mask, scale, backend = inputs
    _save(ctx, AttentionInputs(q, k, v, mask, scale), output[0], output[1], backend, opaque=True)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class AttentionFunction(torch.autograd.Function):
    """Eager autograd path of the Triton backend: the custom op without the dispatcher (same
    inputs, outputs (out, lse), saved tensors and backward). The LSE is not differentiable."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
    ) -> tuple[Tensor, Tensor]:
        p = AttentionInputs(q, k, v, key_padding_mask, scale)
        out, lse = _forward(p, backend)
        _save(ctx, p, out, lse, backend, opaque=False)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero tensor for the LSE's (absent) gradient
        return out, lse

    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------- public API


def _select_traced(
    requested: str | None, device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool
) -> str:
    """:func:`dmdr_fast.ops._attention_common.select_traced` for this op (constants only)."""
    return select_traced(BACKENDS, requested, device_type, dtype, head_dim, has_mask)


# What ``torch.compiler.assume_constant_result`` does, without calling it (see select_traced).
_select_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Non-causal scaled dot-product attention ``softmax(q·kᵀ·scale + mask)·v``.

    Args:
        q: (B, H, Lq, D) queries; float32, float16 or bfloat16 (float64: torch backend only).
        k: (B, H, Lk, D) keys, q's dtype and device; Lk may differ from Lq.
        v: (B, H, Lk, D) values.
        key_padding_mask: optional bool (B, Lk); True marks a padding key, which is ignored
            (``torch.nn.MultiheadAttention``'s convention). A query whose keys are all padding
            outputs zeros and gets zero gradients.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"torch"`` (the reference), ``"sdpa"``, ``"xformers"`` or ``"triton"``; None
            picks automatically (see :mod:`dmdr_fast.backends`; CPU: sdpa, torch; CUDA: sdpa,
            triton, torch).

    Differentiable in q, k and v (not in the mask). Inputs may be non-contiguous (e.g. a
    transposed (B, L, H, D) projection).

    Returns:
        (B, H, Lq, D) in q's dtype.

    Raises:
        TypeError: a non-tensor, non-float input, mixed dtypes, or a non-bool mask.
        ValueError: shape, device or scale errors (the message names the argument).
        BackendUnavailableError: the requested backend cannot run these inputs (e.g. head dim
            above 256, a mask on xformers).
    """
    p = validate(OP, q, k, v, key_padding_mask, scale)
    if torch.compiler.is_compiling():
        name = _select_traced(
            backend, p.device.type, p.q.dtype, static_head_dim(p.q), p.key_padding_mask is not None
        )
        if name == "triton":
            out: Tensor = _attention_op(*p, name)[0]
            return out
        impl = BACKENDS.impls[name]
    else:
        impl = select_backend(BACKENDS, backend, p.device.type, [p.q.dtype], **p.check_inputs())
    result: Tensor = impl.fn(p)
    return result
