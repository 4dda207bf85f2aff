"""What :mod:`dmdr_fast.ops.attention` and :mod:`dmdr_fast.ops.attention_fp8` share: the input
record and its validation, the backends' input checks, the backend choice under ``torch.compile``
and the Triton launch helpers (docs/architecture.md §5).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from dmdr_fast._native import get_triton_kernels
from dmdr_fast.backends import OpBackends, select_backend
from dmdr_fast.ops._common import check_float_tensor, check_same_device, is_number

__all__ = [
    "MAX_HEAD_DIM",
    "AttentionInputs",
    "block_d",
    "check_launch",
    "head_dim_check",
    "launch",
    "mask_arg",
    "rows_last",
    "select_traced",
    "static_head_dim",
    "strides3",
    "triton_size_check",
    "validate",
]

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
INTERPRETER_BLOCKS = (32, 16)  # (BLOCK_M, BLOCK_N) under TRITON_INTERPRET=1: few programs, ragged tails


class AttentionInputs(NamedTuple):
    """Validated inputs of one attention call (``attention`` or ``attention_fp8``): built once
    (by validation, or inside the custom ops from their flat arguments) and passed whole to the
    backends. Field order = the custom ops' argument order."""

    q: Tensor  # (B, H, Lq, D)
    k: Tensor  # (B, H, Lk, D)
    v: Tensor  # (B, H, Lk, D)
    key_padding_mask: Tensor | None  # bool (B, Lk), True = padding
    scale: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    def check_inputs(self) -> dict[str, Any]:
        """What the backends' input checks look at."""
        q, k, v = self.q, self.k, self.v
        return {
            "device": self.device,
            "head_dim": q.shape[-1],
            "has_mask": self.key_padding_mask is not None,
            "batch_heads": q.shape[0] * q.shape[1],
            "row_span": max(x.shape[2] * x.stride(2) for x in (q, k, v)),
            "requires_grad": any(x.requires_grad for x in (q, k, v)),
        }


def validate(
    op: str, q: object, k: object, v: object, key_padding_mask: object, scale: object
) -> AttentionInputs:
    """Check every argument (messages name ``op`` and the argument) and build the record; the
    scale defaults to ``1/sqrt(D)``."""
    tensors = []
    for name, arg in (("q", q), ("k", k), ("v", v)):
        x = check_float_tensor(op, name, arg)
        tensors.append(x)
        if x.dim() != 4:
            raise ValueError(f"{op}: `{name}` must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{op}: `{name}` must have no zero-size dimension, got shape {tuple(x.shape)}")
    q, k, v = tensors
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
    mask: Tensor | None = None
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
        mask = key_padding_mask
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not is_number(scale) or not math.isfinite(scale):
        raise ValueError(f"{op}: `scale` must be a finite number or None (1/sqrt(D)), got {scale!r}")
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=mask)
    return AttentionInputs(q, k, v, mask, float(scale))


# ----------------------------------------------------------------------------- input checks


def head_dim_check(*, head_dim: int, **_: object) -> list[str]:
    if head_dim > MAX_HEAD_DIM:
        return [f"head dim {head_dim} > {MAX_HEAD_DIM} (the kernels keep a D-wide row in registers)"]
    return []


def triton_size_check(*, batch_heads: int = 1, row_span: int = 0, **_: object) -> list[str]:
    reasons = []
    if batch_heads > 65535:
        reasons.append(f"B·H = {batch_heads} > 65535 (grid y-dimension limit)")
    if row_span >= 2**31:
        reasons.append(f"one (batch, head) slice spans {row_span} elements >= 2^31 (32-bit tile offsets)")
    return reasons


# ----------------------------------------------------------------------------- torch.compile


def static_head_dim(q: Tensor) -> int:
    """A Python-int stand-in for q's head dim while tracing (it may be symbolic with
    ``dynamic=True``): 256 when it is <= 256, else 257. Only that comparison matters to the
    backends, and dynamo guards the graph on it."""
    return MAX_HEAD_DIM if q.shape[-1] <= MAX_HEAD_DIM else MAX_HEAD_DIM + 1


def select_traced(
    table: OpBackends,
    requested: str | None,
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    has_mask: bool,
) -> str:
    """The backend choice under ``torch.compile``: evaluated once, while tracing, from Python
    constants (imports and cached availability checks are not traceable), so the graph holds no
    dispatch logic. The head dim is specialised; the size limits that depend on B, H and L are
    checked by the Triton launchers at run time instead. Consequence: a ``use_backend()`` or
    ``DMDR_FAST_BACKEND`` change after compiling needs ``torch.compiler.reset()``.

    Each op wraps this in a function of Python constants only (its table a global, not an
    argument) marked as dynamo does for ``torch.compiler.assume_constant_result``, without calling
    it: the decorator imports torch._dynamo (and with it triton) at import time, which
    ``import dmdr_fast`` must not do (tests/test_import.py). tests/ops/test_attention.py compiles
    with fullgraph=True to catch a change of this mechanism in a future torch.
    """
    device = torch.device(device_type)
    impl = select_backend(
        table, requested, device_type, [dtype], device=device, head_dim=head_dim, has_mask=has_mask
    )
    return impl.name


# ----------------------------------------------------------------------------- Triton launch helpers


def rows_last(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1; other strides are free (e.g. (B, L, H, D) views)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def mask_arg(mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, int]:
    """(uint8 (B, Lk) view of the mask, its batch stride); ``fallback`` when there is no mask."""
    if mask is None:
        return fallback, 0
    m = mask.contiguous().view(torch.uint8)
    return m, m.stride(0)


def strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def launch(
    kernel: Any, kind: str, rows: int, BH: int, block_d: int, device: torch.device, *args: Any, **kwargs: Any
) -> None:
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
        bm, bn = INTERPRETER_BLOCKS
        grid = (triton.cdiv(rows, bn if tile == "BLOCK_N" else bm), BH)
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **kwargs)


def check_launch(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Size limits of the Triton grid / 32-bit tile offsets (also checked at dispatch, except
    under torch.compile where shapes may be symbolic)."""
    reasons = triton_size_check(
        batch_heads=q.shape[0] * q.shape[1], row_span=max(x.shape[2] * x.stride(2) for x in (q, k, v))
    )
    if reasons:
        raise ValueError(f"attention: the triton backend cannot run these inputs: {'; '.join(reasons)}")


def block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())
