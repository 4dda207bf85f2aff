"""Fused non-causal attention: ``dmdr_fast.ops.attention`` and ``dmdr_fast.ops.attention_fp8``.

Order of this file (Liger-style): backend implementations (torch reference, SDPA, xformers,
Triton launchers) → backend registration → the ``dmdr_fast::attention`` custom ops with their
fake and autograd → ``AttentionFunction`` (the low-overhead eager Triton path) → the public
wrapper with validation → the FP8 forward (quantisation helper, emulation, launcher, op).

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

FP8 is a separate, forward-only function, :func:`attention_fp8` (``dmdr_fast::attention_fp8``),
rather than a flag of :func:`attention`: it has no backward, different backends and a different
accuracy contract (SQNR, not the flash tolerance rule).
"""

from __future__ import annotations

import functools
import math

import torch

from dmdr_fast import backends
from dmdr_fast._native import get_triton_kernels, triton_error
from dmdr_fast.ops._common import (
    FLOAT_DTYPES,
    FUSED_DTYPES,
    check_float_tensor,
    check_same_device,
    cuda_capability_check,
    device_context,
)
from dmdr_fast.ops.reference import _attention_probs, attention_bwd_ref, attention_ref

__all__ = ["AttentionFunction", "attention", "attention_fp8", "quantize_fp8_per_head"]

OP = "attention"
OP_FP8 = "attention_fp8"
Tensor = torch.Tensor
MAX_HEAD_DIM = 256
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
P_SCALE_FP8 = 256.0  # the kernels quantise 256·P (a power of two: exact) so small P avoid subnormals
_INTERPRETER_BLOCKS = (32, 16)  # (BLOCK_M, BLOCK_N) under TRITON_INTERPRET=1: few programs, ragged tails


# ----------------------------------------------------------------------------- backends
# Each backend function takes validated (q, k, v, key_padding_mask, scale) and returns the output
# (B, H, Lq, D) in q's dtype, differentiable in q, k, v through ordinary autograd.


def attention_torch(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Reference backend: :func:`dmdr_fast.ops.reference.attention_ref` (fp32, fp64 for fp64)."""
    return attention_ref(q, k, v, key_padding_mask, scale)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with our mask convention.

    SDPA's boolean ``attn_mask`` means True = attend, the opposite of a key padding mask. A
    batch element whose keys are all padding would give NaN rows; its mask is lifted (any finite
    attention) and its output multiplied by 0, which also zeroes its gradients.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if key_padding_mask is None:
        return sdpa(q, k, v, scale=scale)
    keep = ~key_padding_mask  # (B, Lk), True = attend
    empty = ~keep.any(dim=-1)  # (B,), every key is padding
    keep = keep | empty[:, None]
    out = sdpa(q, k, v, attn_mask=keep[:, None, None, :], scale=scale)
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


def attention_xformers(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    """``xformers.ops.memory_efficient_attention`` (layout (B, L, H, D); no mask support here)."""
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- Triton launchers


def _rows_last(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1; other strides are free (e.g. (B, L, H, D) views)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_arg(mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, int]:
    """(uint8 (B, Lk) view of the mask, its batch stride); ``fallback`` when there is no mask."""
    if mask is None:
        return fallback, 0
    m = mask.contiguous().view(torch.uint8)
    return m, m.stride(0)


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _launch(kernel, kind: str, rows: int, BH: int, block_d: int, device: torch.device, *args, **kwargs):
    """Autotuned launch on a GPU; one fixed small configuration under the interpreter.

    ``rows``: the length the grid's first axis tiles (Lq for BLOCK_M kernels, Lk for dK/dV).
    """
    kernels = get_triton_kernels("attention")
    import triton

    tile = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if device.type == "cuda":
        tuned = kernels.tuned(kernel, "fwd" if kind == "fwd" else "bwd", block_d)
        tuned[lambda meta: (triton.cdiv(rows, meta[tile]), BH)](*args, BLOCK_D=block_d, **kwargs)
    else:
        bm, bn = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(rows, bn if tile == "BLOCK_N" else bm), BH)
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **kwargs)


def _check_launch(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Size limits of the Triton grid / 32-bit tile offsets (also checked at dispatch, except
    under torch.compile where shapes may be symbolic)."""
    reasons = _triton_size_check(
        batch_heads=q.shape[0] * q.shape[1], row_span=max(x.shape[2] * x.stride(2) for x in (q, k, v))
    )
    if reasons:
        raise ValueError(f"{OP}: the triton backend cannot run these inputs: {'; '.join(reasons)}")


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the user asked for fp32); 16-bit: tensor cores (the
    # "tf32" setting is Triton's default and only affects fp32 operands).
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Flash forward: (out with q's shape, dtype and layout; (B, H, Lq) float32 natural-log LSE)."""
    kernels = get_triton_kernels("attention")
    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    _check_launch(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)  # keeps q's layout: a (B, L, H, D) view stays one after transposing back
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask, stride_mb = _mask_arg(key_padding_mask, lse)
    with device_context(q.device):
        _launch(
            kernels.attention_fwd, "fwd", Lq, B * H, _block_d(D), q.device,
            q, k, v, out, lse, mask, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), 1, *_strides3(out), stride_mb,
            H, Lq, Lk, D, scale * math.log2(math.e),
            HAS_MASK=key_padding_mask is not None, FP8=False, INPUT_PRECISION=_input_precision(q.dtype),
        )  # fmt: skip
    return out, lse


def attention_bwd_triton(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash backward: δ = rowsum(dO∘O), then dK/dV (per key block) and dQ (per query block)."""
    kernels = get_triton_kernels("attention")
    do = _rows_last(grad_out.to(q.dtype))
    q, k, v, out = _rows_last(q), _rows_last(k), _rows_last(v), _rows_last(out)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = _block_d(D)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, stride_mb = _mask_arg(key_padding_mask, lse)
    flags = {"HAS_MASK": key_padding_mask is not None, "INPUT_PRECISION": _input_precision(q.dtype)}
    import triton

    with device_context(q.device):
        block_m = 64 if q.device.type == "cuda" else _INTERPRETER_BLOCKS[0]
        kernels.attention_bwd_preprocess[(triton.cdiv(Lq, block_m), B * H)](
            out, do, delta, *_strides3(out), *_strides3(do), H, Lq, D, BLOCK_M=block_m, BLOCK_D=block_d
        )
        _launch(
            kernels.attention_bwd_dkdv, "dkdv", Lk, B * H, block_d, q.device,
            q, k, v, do, dk, dv, lse, delta, mask,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            stride_mb, H, Lq, Lk, D, scale, **flags,
        )  # fmt: skip
        _launch(
            kernels.attention_bwd_dq, "dq", Lq, B * H, block_d, q.device,
            q, k, v, do, dq, lse, delta, mask,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
            stride_mb, H, Lq, Lk, D, scale, **flags,
        )  # fmt: skip
    return dq, dk, dv


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    """Triton flash attention, differentiable through :class:`AttentionFunction`."""
    return AttentionFunction.apply(q, k, v, key_padding_mask, scale)


# ----------------------------------------------------------------------------- registration


def _head_dim_check(*, head_dim: int, **_: object) -> list[str]:
    if head_dim > MAX_HEAD_DIM:
        return [f"head dim {head_dim} > {MAX_HEAD_DIM} (the kernels keep a D-wide row in registers)"]
    return []


def _triton_size_check(*, batch_heads: int = 1, row_span: int = 0, **_: object) -> list[str]:
    reasons = []
    if batch_heads > 65535:
        reasons.append(f"B·H = {batch_heads} > 65535 (grid y-dimension limit)")
    if row_span >= 2**31:
        reasons.append(f"one (batch, head) slice spans {row_span} elements >= 2^31 (32-bit tile offsets)")
    return reasons


def _no_mask_check(*, has_mask: bool, **_: object) -> list[str]:
    if has_mask:
        return [
            "key_padding_mask is not supported (it would need a dense (B, H, Lq, Lk) bias); "
            "use the sdpa or triton backend"
        ]
    return []


backends.register(backends.BackendImpl(
    OP, "torch", attention_torch, frozenset({"cpu", "cuda"}), FLOAT_DTYPES,
    note="pure-PyTorch reference (the spec): explicit softmax in fp32, materialises Lq×Lk",
))  # fmt: skip
backends.register(backends.BackendImpl(
    OP, "sdpa", attention_sdpa, frozenset({"cpu", "cuda"}), FUSED_DTYPES,
    note="torch.nn.functional.scaled_dot_product_attention (flash / efficient / cuDNN / math)",
))  # fmt: skip
backends.register(backends.BackendImpl(
    OP, "xformers", attention_xformers, frozenset({"cuda"}), FUSED_DTYPES, _xformers_available,
    input_checks=(_no_mask_check,), note="xformers.ops.memory_efficient_attention (optional)",
))  # fmt: skip
backends.register(backends.BackendImpl(
    OP, "triton", attention_triton, frozenset({"cpu", "cuda"}), FUSED_DTYPES, triton_error,
    input_checks=(cuda_capability_check(8, 0), _head_dim_check, _triton_size_check),
    note="Triton flash attention fwd + bwd (CPU: interpreter only)",
))  # fmt: skip
# Automatic choice. CUDA: SDPA before Triton until scripts/gpu_check.sh has validated our kernels
# on a GPU and measured them against SDPA's best kernel (BENCHMARKS.md): no GPU has run them yet.
backends.set_priority(OP, "cuda", ("sdpa", "triton", "torch"))
backends.set_priority(OP, "cpu", ("sdpa", "torch"))


# ----------------------------------------------------------------------------- custom op + autograd


def _forward(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):
    """(out, lse): lse is the (B, H, Lq) float32 log-sum-exp for Triton, an empty tensor otherwise."""
    if backend == "triton":
        return attention_fwd_triton(q, k, v, mask, scale)
    out = backends.get_backends(OP)[backend].fn(q, k, v, mask, scale)
    return out, q.new_empty((0,), dtype=torch.float32)


def _backward(backend, grad_out, q, k, v, out, lse, mask, scale):
    """(dq, dk, dv) for the custom op: Triton kernels, or the closed-form reference backward."""
    if backend == "triton":
        return attention_bwd_triton(grad_out, q, k, v, out, lse, mask, scale)
    return attention_bwd_ref(grad_out, q, k, v, mask, scale)


@torch.library.custom_op("dmdr_fast::attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    out, lse = _forward(backend, q, k, v, key_padding_mask, scale)
    return out.contiguous(), lse


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
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
    dq, dk, dv = _backward(backend, grad_out, q, k, v, out, lse, key_padding_mask, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, backend = inputs
    ctx.save_for_backward(q, k, v, mask, output[0], output[1])
    ctx.scale, ctx.backend = scale, backend


def _op_backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_op_backward, setup_context=_setup_context)


class AttentionFunction(torch.autograd.Function):
    """Eager autograd path of the Triton backend (same math and saved tensors as the custom op).

    Saves q, k, v, the output and the (B, H, Lq) float32 LSE — no Lq×Lk tensor.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale):
        out, lse = attention_fwd_triton(q, k, v, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd_triton(grad_out, q, k, v, out, lse, mask, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------- public API


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(q, k, v, key_padding_mask, scale, op: str = OP) -> tuple[torch.device, float]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, x)
        if x.dim() != 4:
            raise ValueError(f"{op}: `{name}` must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{op}: `{name}` must have no zero-size dimension, got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: `q`, `k` and `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(
            f"{op}: `k` must have shape (B, H, Lk, D) = ({B}, {H}, Lk, {D}) to match `q` "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"{op}: `v` must have the shape of `k` {tuple(k.shape)}, got {tuple(v.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = (
                key_padding_mask.dtype
                if isinstance(key_padding_mask, torch.Tensor)
                else type(key_padding_mask)
            )
            raise TypeError(f"{op}: `key_padding_mask` must be a bool tensor (True = padding), got {got}")
        if key_padding_mask.shape != (B, k.shape[2]):
            raise ValueError(
                f"{op}: `key_padding_mask` must have shape (B, Lk) = ({B}, {k.shape[2]}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not _is_number(scale) or not math.isfinite(scale):
        raise ValueError(f"{op}: `scale` must be a finite number or None (1/sqrt(D)), got {scale!r}")
    device = check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    return device, float(scale)


def _static_head_dim(q: Tensor) -> int:
    """A Python-int stand-in for q's head dim while tracing (it may be symbolic with
    ``dynamic=True``): 256 when it is <= 256, else 257. Only that comparison matters to the
    backends, and dynamo guards the graph on it."""
    return MAX_HEAD_DIM if q.shape[-1] <= MAX_HEAD_DIM else MAX_HEAD_DIM + 1


def _select_traced(
    op: str, requested: str | None, device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool
) -> str:
    """The backend choice under ``torch.compile``: evaluated once, while tracing, from Python
    constants (imports and cached availability checks are not traceable), so the graph holds no
    dispatch logic. The head dim is specialised; the size limits that depend on B, H and L are
    checked by the Triton launchers at run time instead. Consequence: a ``use_backend()`` or
    ``DMDR_FAST_BACKEND`` change after compiling needs ``torch.compiler.reset()``.
    """
    device = torch.device(device_type)
    return backends.select_backend(
        op, requested, device_type, [dtype], device=device, head_dim=head_dim, has_mask=has_mask
    ).name


# What ``torch.compiler.assume_constant_result`` does, without calling it: the decorator imports
# torch._dynamo (and with it triton) at import time, which ``import dmdr_fast`` must not do
# (tests/test_import.py). tests/ops/test_attention.py compiles with fullgraph=True to catch a
# change of this mechanism in a future torch.
_select_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _check_inputs(q, k, v, key_padding_mask, device) -> dict:
    """What the backends' input checks look at."""
    span = max(x.shape[2] * x.stride(2) for x in (q, k, v))
    return {
        "device": device,
        "head_dim": q.shape[-1],
        "has_mask": key_padding_mask is not None,
        "batch_heads": q.shape[0] * q.shape[1],
        "row_span": span,
        "requires_grad": any(x.requires_grad for x in (q, k, v)),
    }


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
    device, scale = _validate(q, k, v, key_padding_mask, scale)
    if torch.compiler.is_compiling():
        name = _select_traced(
            OP, backend, device.type, q.dtype, _static_head_dim(q), key_padding_mask is not None
        )
        if name == "triton":
            return _attention_op(q, k, v, key_padding_mask, scale, name)[0]
        return backends.get_backends(OP)[name].fn(q, k, v, key_padding_mask, scale)
    impl = backends.select_backend(
        OP, backend, device.type, [q.dtype], **_check_inputs(q, k, v, key_padding_mask, device)
    )
    return impl.fn(q, k, v, key_padding_mask, scale)


# ----------------------------------------------------------------------------- FP8 (e4m3) forward


def quantize_fp8_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(batch, head) symmetric e4m3 quantisation, done with torch (not Triton casts).

    ``descale = amax_{L, D}|x| / 448`` and ``x8 = saturate(x / descale)`` in ``torch.float8_e4m3fn``,
    so ``x ≈ x8.float() · descale`` (a head of zeros gets descale 1).

    Args:
        x: (B, H, L, D) floating tensor.

    Returns:
        ``(x8, descale)``: x8 (B, H, L, D) float8_e4m3fn, descale (B, H) float32.
    """
    amax = x.detach().abs().amax(dim=(-2, -1)).float()
    descale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    x8 = (x.detach().float() / descale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, descale


def attention_fp8_torch(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    """Emulation of the FP8 kernel's math in float32 (runs anywhere; the CPU path of ``attention_fp8``).

    q, k, v are quantised as by the kernel launcher; P = softmax of the dequantised scores is
    requantised as ``e4m3(256·P̃)/256`` with P̃ = exp(S − rowmax) before P·V. The kernel quantises
    P̃ relative to its *running* row max, so it matches this emulation up to the rounding of P.
    """
    (q8, sq), (k8, sk), (v8, sv) = (quantize_fp8_per_head(x) for x in (q, k, v))
    qd, kd, vd = (x8.float() * s[..., None, None] for x8, s in ((q8, sq), (k8, sk), (v8, sv)))
    p = _attention_probs(qd, kd, key_padding_mask, scale, torch.float32)  # P = P̃ / l
    # P̃ = exp(S − rowmax) = P / rowmax(P) (its row max is 1), then l = rowsum(P̃) as in the kernel.
    pmax = p.amax(dim=-1, keepdim=True)
    p_tilde = p / torch.where(pmax > 0, pmax, 1.0)
    p_q = (p_tilde * P_SCALE_FP8).to(FP8_DTYPE).float() / P_SCALE_FP8
    l = p_tilde.sum(dim=-1, keepdim=True)
    out = (p_q @ vd) / torch.where(l > 0, l, 1.0)
    return out.to(q.dtype)


def attention_fp8_triton(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    """FP8 flash forward: torch quantises q, k, v per head; the kernel takes the e4m3 tensors + scales."""
    kernels = get_triton_kernels("attention")
    _check_launch(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    (q8, sq), (k8, sk), (v8, sv) = (quantize_fp8_per_head(x) for x in (q, k, v))
    q8, k8 = _rows_last(q8), _rows_last(k8)
    # V with the sequence innermost (row stride of Lk rounded up to 16 bytes): fp8 tensor-core
    # MMAs on Hopper want both operands K-major, and P·V contracts over the keys.
    lk_pad = -(-Lk // 16) * 16
    v8t = torch.empty(B, H, D, lk_pad, dtype=FP8_DTYPE, device=q.device)[..., :Lk]
    v8t.copy_(v8.transpose(-1, -2))
    v8 = v8t.transpose(-1, -2)
    descale = torch.stack([sq, sk, sv]).reshape(3, B * H).contiguous()
    out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask, stride_mb = _mask_arg(key_padding_mask, lse)
    with device_context(q.device):
        _launch(
            kernels.attention_fwd, "fwd", Lq, B * H, _block_d(D), q.device,
            q8, k8, v8, out, lse, mask, descale,
            *_strides3(q8), *_strides3(k8), *_strides3(v8), v8.stride(3), *_strides3(out), stride_mb,
            H, Lq, Lk, D, scale * math.log2(math.e),
            HAS_MASK=key_padding_mask is not None, FP8=True, INPUT_PRECISION="tf32",
        )  # fmt: skip
    return out


def _fp8_device_check(*, device: torch.device, **_: object) -> list[str]:
    if device.type != "cuda":
        return ["the Triton interpreter cannot run fp8 arithmetic (DESIGN §3); backend='torch' emulates it"]
    return []


backends.register(backends.BackendImpl(
    OP_FP8, "torch", attention_fp8_torch, frozenset({"cpu", "cuda"}), FUSED_DTYPES,
    note="float32 emulation of the FP8 kernel (torch quantisation, dequantised math)",
))  # fmt: skip
backends.register(backends.BackendImpl(
    OP_FP8, "triton", attention_fp8_triton, frozenset({"cpu", "cuda"}), FUSED_DTYPES, triton_error,
    input_checks=(_fp8_device_check, cuda_capability_check(8, 9), _head_dim_check, _triton_size_check),
    note="Triton flash forward on e4m3 tensor cores (sm_89+), per-head scales",
))  # fmt: skip
backends.set_priority(OP_FP8, "cuda", ("triton", "torch"))
backends.set_priority(OP_FP8, "cpu", ("torch",))


@torch.library.custom_op("dmdr_fast::attention_fp8", mutates_args=())
def _attention_fp8_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> Tensor:
    return backends.get_backends(OP_FP8)[backend].fn(q, k, v, key_padding_mask, scale).contiguous()


@_attention_fp8_op.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    return q.new_empty(q.shape)


def attention_fp8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """FP8 (e4m3) attention forward for no-grad score evaluations (DESIGN §2, Precision).

    Same contract as :func:`attention` (shapes, mask, scale, output dtype) but forward-only:
    q, k and v are quantised per (batch, head) with :func:`quantize_fp8_per_head` (torch), Q·Kᵀ
    and P·V run on e4m3 operands with float32 accumulation, and the output is returned in q's
    dtype. Expect ~25–30 dB SQNR against float32 attention on unit-scale inputs.

    Backends: ``"triton"`` (CUDA, compute capability >= 8.9) and ``"torch"`` (a float32
    emulation of the same quantisation, on any device; the automatic choice on CPU).

    Raises:
        ValueError: an input requires grad (there is no FP8 backward; use :func:`attention`),
            or the errors of :func:`attention`.
        BackendUnavailableError: the requested backend cannot run these inputs.
    """
    device, scale = _validate(q, k, v, key_padding_mask, scale, op=OP_FP8)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.requires_grad:
            raise ValueError(
                f"{OP_FP8}: `{name}` requires grad, but the FP8 path is forward-only (no-grad score "
                "evaluations); call it under torch.no_grad() / on detached tensors, or use attention()"
            )
    if torch.compiler.is_compiling():
        name = _select_traced(
            OP_FP8, backend, device.type, q.dtype, _static_head_dim(q), key_padding_mask is not None
        )
        return _attention_fp8_op(q, k, v, key_padding_mask, scale, name)
    impl = backends.select_backend(
        OP_FP8, backend, device.type, [q.dtype], **_check_inputs(q, k, v, key_padding_mask, device)
    )
    return impl.fn(q, k, v, key_padding_mask, scale)
