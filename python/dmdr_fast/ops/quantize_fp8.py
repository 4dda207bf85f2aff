"""Row-wise (per-token) dynamic FP8 quantisation: ``dmdr_fast.ops.quantize_fp8``.

Order of this file (docs/architecture.md §5): the input record → backend launchers (torch
reference, C++ CPU, CUDA, Triton) → the backend table → the ``dmdr_fast::quantize_fp8`` custom op
with its fake → the public wrapper with validation.

The op is forward-only, with no autograd: quantisation is piecewise constant (its derivative is
zero almost everywhere), so a gradient through it is a choice of the caller — e.g. an FP8 linear's
own ``autograd.Function`` that quantises its detached input in ``forward`` and computes the input
gradient in high precision. The wrapper refuses an input that autograd would otherwise record.

Memory: the outputs only (one byte per element for q, four per row for the scale); non-contiguous
inputs are first copied to contiguous memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dmdr_fast._native import get_triton_kernels
from dmdr_fast.backends import OpBackends, select_backend
from dmdr_fast.ops._common import (
    FP8_DTYPES,
    OUT_MAX,
    check_float_tensor,
    cuda_capability_check,
    dtype_code,
    fused_backends,
    is_number,
    on_input_device,
)
from dmdr_fast.ops.reference import quantize_fp8_ref

__all__ = ["BACKENDS", "QuantizeFp8Inputs", "quantize_fp8"]

OP = "quantize_fp8"
Tensor = torch.Tensor
# Smallest float32 normal: the eps floor keeps every scale at or above it, so 1/scale is finite and
# no backend's denormal handling (flush-to-zero on GPUs) can change a scale.
_F32_TINY = 1.1754943508222875e-38


class QuantizeFp8Inputs(NamedTuple):
    """Validated inputs of one ``quantize_fp8`` call, the Python twin of the C++
    ``QuantizeFp8Params`` (csrc/include/dmdr_fast/quantize_fp8.h). Field order = the op's
    argument order."""

    x: Tensor  # (..., K) activations (or gradients)
    fp8_dtype: torch.dtype  # torch.float8_e4m3fn or torch.float8_e5m2
    eps: float  # floor of the row amax
    amax_ub: float  # cap of the row amax (math.inf: none)

    @property
    def device(self) -> torch.device:
        return self.x.device


# ----------------------------------------------------------------------------- launchers
# Every launcher takes a QuantizeFp8Inputs and returns (q, scale): q of x's shape in fp8_dtype and
# scale of shape (..., 1) float32, both contiguous.


def quantize_fp8_fwd_torch(p: QuantizeFp8Inputs) -> tuple[Tensor, Tensor]:
    """Reference backend: :func:`dmdr_fast.ops.reference.quantize_fp8_ref`."""
    q, scale = quantize_fp8_ref(*p)
    return q.contiguous(), scale.contiguous()


class _Rows(NamedTuple):
    """The (rows, K) contiguous view the kernels read, and the outputs they write."""

    x: Tensor  # (rows, K)
    q: Tensor  # (..., K) fp8, contiguous
    scale: Tensor  # (..., 1) float32, contiguous

    @property
    def shape(self) -> tuple[int, int]:
        rows, K = self.x.shape
        return rows, K


def _rows(p: QuantizeFp8Inputs) -> _Rows:
    x = p.x.detach()
    K = x.shape[-1]
    q = torch.empty(x.shape, dtype=p.fp8_dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return _Rows(x.contiguous().view(-1, K), q, scale)


def quantize_fp8_fwd_cpp(p: QuantizeFp8Inputs) -> tuple[Tensor, Tensor]:
    """Fused C++ CPU kernel (OpenMP over rows, threads = ``torch.get_num_threads()``)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    r = _rows(p)
    rows, K = r.shape
    if rows:
        _C.quantize_fp8_fwd_cpu(
            r.x.data_ptr(), r.q.data_ptr(), r.scale.data_ptr(), rows, K, p.eps, p.amax_ub,
            dtype_code(r.x.dtype), dtype_code(p.fp8_dtype), torch.get_num_threads(),
        )  # fmt: skip
    return r.q, r.scale


def quantize_fp8_fwd_cuda(p: QuantizeFp8Inputs) -> tuple[Tensor, Tensor]:
    """Fused CUDA kernel (one launch on the current stream, a warp per row)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    r = _rows(p)
    rows, K = r.shape
    dev = r.x.device
    if rows:
        _C.quantize_fp8_fwd_cuda(
            r.x.data_ptr(), r.q.data_ptr(), r.scale.data_ptr(), rows, K, p.eps, p.amax_ub,
            dtype_code(r.x.dtype), dtype_code(p.fp8_dtype),
            dev.index if dev.index is not None else torch.cuda.current_device(),
            torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
    return r.q, r.scale


def _triton_blocks(rows: int, K: int, device: torch.device) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_K, ONE_PASS): a whole row per tile up to 8192 elements (read once), else
    4096-element chunks read twice; about 4096 elements per program on a GPU."""
    if device.type != "cuda":  # interpreter: one large tile is fastest (numpy, no loop overhead)
        block_k = min(1 << (K - 1).bit_length(), 1024)
        return max(1, min(64, 4096 // block_k)), block_k, block_k >= K
    block_k = 1 << (K - 1).bit_length()
    if block_k > 8192:
        return 1, 4096, False
    return max(1, min(64, 4096 // block_k)), block_k, True


@on_input_device
def quantize_fp8_fwd_triton(p: QuantizeFp8Inputs) -> tuple[Tensor, Tensor]:
    """Fused Triton kernel. On CPU (TRITON_INTERPRET=1) the interpreter's fp8 casts are wrong
    (docs/architecture.md §6), so there the kernel writes the codes with its integer encoder
    (``HW_CAST=False``), the CPU kernel's algorithm; on a GPU it uses the hardware conversion."""
    kernels = get_triton_kernels("quantize_fp8")

    r = _rows(p)
    rows, K = r.shape
    if rows:
        block_m, block_k, one_pass = _triton_blocks(rows, K, r.x.device)
        hw = r.x.device.type == "cuda"
        kernels.quantize_fp8_kernel[(-(-rows // block_m),)](
            r.x, r.q if hw else r.q.view(torch.uint8), r.scale, rows, K, p.eps, p.amax_ub,
            OUT_MAX[p.fp8_dtype], BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass,
            E4M3=p.fp8_dtype == torch.float8_e4m3fn, HW_CAST=hw,
        )  # fmt: skip
    return r.q, r.scale


# ----------------------------------------------------------------------------- backend table

BACKENDS: OpBackends = fused_backends(
    OP,
    quantize_fp8_fwd_torch,
    quantize_fp8_fwd_cpp,
    quantize_fp8_fwd_cuda,
    quantize_fp8_fwd_triton,
    # Triton lowers fp8 conversions to hardware instructions only from sm_89 (Ada, Hopper).
    triton_checks=(cuda_capability_check(8, 9),),
)


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("dmdr_fast::quantize_fp8", mutates_args=())
def _quantize_fp8_op(
    x: Tensor, fp8_dtype: torch.dtype, eps: float, amax_ub: float, backend: str
) -> tuple[Tensor, Tensor]:
    result: tuple[Tensor, Tensor] = BACKENDS.impls[backend].fn(QuantizeFp8Inputs(x, fp8_dtype, eps, amax_ub))
    return result


@_quantize_fp8_op.register_fake
def _(x: Tensor, fp8_dtype: torch.dtype, eps: float, amax_ub: float, backend: str) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# ----------------------------------------------------------------------------- public API


def _select_traced(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    """The backend choice under ``torch.compile``, evaluated once while tracing from Python
    constants, so that the graph holds no dispatch logic and compiles with ``fullgraph=True``
    (an FP8 linear inside a compiled model). As for attention
    (:func:`dmdr_fast.ops._attention_common.select_traced`): a ``use_backend()`` or
    ``DMDR_FAST_BACKEND`` change after compiling needs ``torch.compiler.reset()``."""
    return select_backend(BACKENDS, requested, device_type, [dtype], device=torch.device(device_type)).name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo at import
# time (see dmdr_fast.ops._attention_common.select_traced).
_select_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _validate(x: object, fp8_dtype: object, eps: object, amax_ub: object) -> QuantizeFp8Inputs:
    """Check every argument (messages name it) and build the record (scalars as Python floats)."""
    x = check_float_tensor(OP, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: `x` must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    if fp8_dtype not in FP8_DTYPES:
        raise TypeError(
            f"{OP}: `fp8_dtype` must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype!r}"
        )
    assert isinstance(fp8_dtype, torch.dtype)
    min_eps = _F32_TINY * OUT_MAX[fp8_dtype]
    if not is_number(eps) or not (min_eps <= eps < math.inf):
        raise ValueError(
            f"{OP}: `eps` must be a finite number >= {min_eps:.3g} (so that eps / fp8_max is a normal "
            f"float32), got {eps!r}"
        )
    ub = math.inf if amax_ub is None else amax_ub
    if not is_number(ub) or not (ub > 0):
        raise ValueError(f"{OP}: `amax_ub` must be None or a number > 0, got {amax_ub!r}")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{OP}: `x` requires grad, but quantisation has no gradient; pass `x.detach()` (or call "
            "under torch.no_grad()), and give the caller's autograd.Function the backward it needs"
        )
    return QuantizeFp8Inputs(x, fp8_dtype, float(eps), float(ub))


def quantize_fp8(
    x: Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    eps: float = 1e-12,
    amax_ub: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Row-wise (per-token) dynamic FP8 quantisation (docs/architecture.md §5).

    Per row of the last dimension, in float32 (:func:`dmdr_fast.ops.reference.quantize_fp8_ref`)::

        amax  = max |x| over the row's finite entries
        scale = max(min(amax, amax_ub), eps) / fp8_max     (448 for e4m3fn, 57344 for e5m2)
        q     = fp8(clamp(x · (1/scale), −fp8_max, fp8_max)),  round to nearest even

    so that ``x ≈ q.float() * scale``. For a 2-D ``x`` of shape (M, K), ``scale`` (M, 1) is
    ``torch._scaled_mm``'s row-wise ``scale_a``. Defined non-finite behaviour, the same on every
    backend: NaN entries stay NaN in q, ±Inf entries saturate to ±fp8_max, and neither enters the
    row's amax; an all-zero row gives q = 0 and ``scale = eps / fp8_max``. Every backend returns
    the reference's q bit for bit (NaN encodings aside) and its scale exactly.

    Args:
        x: (..., K) float32/float16/bfloat16 tensor (float64: torch backend only, rounded to
            float32 first); non-contiguous inputs are copied. Must not require grad while grad
            mode is on (the op has no gradient).
        fp8_dtype: ``torch.float8_e4m3fn`` (activations, weights) or ``torch.float8_e5m2``
            (gradients).
        eps: floor of the row amax; at least ``2^-126 · fp8_max`` so that the scale is a normal
            float32.
        amax_ub: optional cap of the row amax (outlier rows saturate instead of losing
            resolution); None: no cap.
        backend: ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``; None picks automatically
            (see :mod:`dmdr_fast.backends`).

    Returns:
        ``(q, scale)``: q (..., K) in ``fp8_dtype`` and scale (..., 1) float32, both contiguous.

    Raises:
        TypeError: a non-tensor, integer or complex ``x``, or an unsupported ``fp8_dtype``.
        ValueError: shape or scalar errors, or ``x`` requiring grad (the message names the argument).
        BackendUnavailableError: the requested backend cannot run these inputs.
    """
    p = _validate(x, fp8_dtype, eps, amax_ub)
    if torch.compiler.is_compiling():
        return _quantize_fp8_op(*p, _select_traced(backend, p.device.type, p.x.dtype))
    impl = select_backend(BACKENDS, backend, p.device.type, [p.x.dtype], device=p.device)
    result: tuple[Tensor, Tensor] = impl.fn(p)
    return result
