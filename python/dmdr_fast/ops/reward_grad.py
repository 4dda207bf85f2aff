"""The fused reward-gradient combination: ``dmdr_fast.ops.reward_grad_combine``.

Order of this file (Liger-style, docs/architecture.md §5): the input record → backend launchers
(torch reference, C++ CPU, CUDA, Triton) → the backend table → the ``dmdr_fast::reward_grad_combine``
custom op with its fake → the public wrapper with validation. The math: docs/method.md §7.

There is no autograd: both inputs are gradients (the DMD direction and the reward gradient on
x0), so the op works on detached tensors and its outputs never require grad. Memory: the op writes
``g`` (g_dmd's shape and dtype) plus (4, B) float statistics and (B,) counts. In balanced mode
the fused backends read each input twice (a reduction pass for the per-sample norms, then the
elementwise pass, which finds the inputs in cache for moderate sizes); in fixed mode the weight is
known up front and one pass reads each input once and writes ``g``. The CUDA and Triton launchers
also use a workspace of 4·B·blocks partial sums.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dmdr_fast._native import get_triton_kernels
from dmdr_fast.backends import OpBackends, select_backend
from dmdr_fast.ops._common import (
    OUT_MAX,
    check_float_tensor,
    check_same_device,
    check_same_shape,
    dtype_code,
    fused_backends,
    is_number,
    on_input_device,
    promote,
    triton_grid,
)
from dmdr_fast.ops.reference import RewardGradStats, reward_grad_combine_ref

__all__ = ["BACKENDS", "RewardGradInputs", "RewardGradStats", "reward_grad_combine"]

OP = "reward_grad_combine"
MODES = ("fixed", "balanced")
Tensor = torch.Tensor

_F32_MAX = OUT_MAX[torch.float32]
_F32_TINY = 1.1754943508222875e-38  # smallest normal float32


class RewardGradInputs(NamedTuple):
    """Validated inputs of one ``reward_grad_combine`` call, the Python twin of the C++
    ``RewardGradParams`` (csrc/include/dmdr_fast/reward_grad.h). Built once (by validation, or
    inside the custom op from its flat arguments) and passed whole to the launchers. Field order =
    the custom op's argument order."""

    g_dmd: Tensor  # (B, ...) DMD direction, detached
    g_reward: Tensor  # (B, ...) reward gradient, detached
    balanced: bool  # mode "balanced" (else "fixed")
    weight: float  # the weight of mode "fixed"
    ratio: float
    max_weight: float  # may be math.inf (no cap)
    eps: float

    @property
    def device(self) -> torch.device:
        return self.g_dmd.device


# ----------------------------------------------------------------------------- launchers
# Every launcher takes a RewardGradInputs and returns (g, stats, nonfinite): g with
# g_dmd's shape and dtype, stats a (4, B) tensor [dmd_norm, reward_norm, cosine, weight] in
# float32 (float64 on the torch backend when the compute dtype is float64), nonfinite (B,) int64.


def _cast_out(g: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to the output ``dtype``, saturating at its largest finite value (NaN passes through)."""
    if g.dtype == dtype:
        return g
    if OUT_MAX[dtype] < OUT_MAX[g.dtype]:
        g = g.clamp(-OUT_MAX[dtype], OUT_MAX[dtype])
    return g.to(dtype)


_Result = tuple[Tensor, Tensor, Tensor]


def reward_grad_fwd_torch(p: RewardGradInputs) -> _Result:
    """Reference backend: :func:`dmdr_fast.ops.reference.reward_grad_combine_ref`."""
    mode = "balanced" if p.balanced else "fixed"
    g, s = reward_grad_combine_ref(p.g_dmd, p.g_reward, mode, p.weight, p.ratio, p.max_weight, p.eps)
    stats = torch.stack((s.dmd_norm, s.reward_norm, s.cosine, s.weight))
    return _cast_out(g, p.g_dmd.dtype), stats, s.nonfinite


def _flat_inputs(p: RewardGradInputs) -> tuple[torch.dtype, Tensor, Tensor]:
    """(B, D) contiguous views in one common dtype (kernels take a single element type)."""
    dt = promote([p.g_dmd, p.g_reward])
    B = p.g_dmd.shape[0]
    return dt, p.g_dmd.to(dt).contiguous().view(B, -1), p.g_reward.to(dt).contiguous().view(B, -1)


def _outputs(g_dmd: Tensor, dt: torch.dtype, B: int) -> tuple[Tensor, Tensor, Tensor]:
    """g (g_dmd's shape, kernel dtype), the (4, B) float32 statistics and the (B,) counts."""
    g = torch.empty(g_dmd.shape, dtype=dt, device=g_dmd.device)
    stats = torch.empty(4, B, dtype=torch.float32, device=g_dmd.device)
    nonfinite = torch.empty(B, dtype=torch.int64, device=g_dmd.device)
    return g, stats, nonfinite


def reward_grad_fwd_cpp(p: RewardGradInputs) -> _Result:
    """Fused C++ CPU kernel (OpenMP, threads = ``torch.get_num_threads()``)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    dt, d, r = _flat_inputs(p)
    B, D = d.shape
    g, stats, nonfinite = _outputs(p.g_dmd, dt, B)
    _C.reward_grad_fwd_cpu(
        d.data_ptr(), r.data_ptr(), g.data_ptr(), stats.data_ptr(), nonfinite.data_ptr(),
        B, D, bool(p.balanced), p.weight, p.ratio, p.max_weight, p.eps, dtype_code(dt),
        torch.get_num_threads(),
    )  # fmt: skip
    return _cast_out(g, p.g_dmd.dtype), stats, nonfinite


def reward_grad_fwd_cuda(p: RewardGradInputs) -> _Result:
    """Fused CUDA kernels on the current stream (fixed mode: one launch; balanced: two)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    dt, d, r = _flat_inputs(p)
    B, D = d.shape
    device = d.device.index if d.device.index is not None else torch.cuda.current_device()
    g, stats, nonfinite = _outputs(p.g_dmd, dt, B)
    ws_bytes = _C.reward_grad_workspace_bytes(B, D, device)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=d.device)
    _C.reward_grad_fwd_cuda(
        d.data_ptr(), r.data_ptr(), g.data_ptr(), stats.data_ptr(), nonfinite.data_ptr(),
        B, D, bool(p.balanced), p.weight, p.ratio, p.max_weight, p.eps, dtype_code(dt),
        ws.data_ptr(), ws_bytes, device, torch.cuda.current_stream(d.device).cuda_stream,
    )  # fmt: skip
    return _cast_out(g, p.g_dmd.dtype), stats, nonfinite


@on_input_device
def reward_grad_fwd_triton(p: RewardGradInputs) -> _Result:
    """Fused Triton kernels (two launches); on CPU only under TRITON_INTERPRET=1."""
    kernels = get_triton_kernels("reward_grad")
    import triton

    dt, d, r = _flat_inputs(p)
    B, D = d.shape
    block, iters, nblk = triton_grid(B, D, d.device)
    g, stats, nonfinite = _outputs(p.g_dmd, dt, B)
    part = torch.empty(3, B, nblk, dtype=torch.float32, device=d.device)
    part_n = torch.empty(B, nblk, dtype=torch.int32, device=d.device)
    out_max = math.inf if dt == torch.float32 else OUT_MAX[dt]
    fixed = not p.balanced  # the weight is known: the reduction writes g, the 2nd launch only finishes
    kernels._reward_grad_reduce_kernel[(nblk, B)](
        d, r, g, part, part_n, D, B, p.weight, out_max, WRITE_G=fixed, BLOCK_SIZE=block, ITERS=iters,
    )  # fmt: skip
    kernels._reward_grad_fwd_kernel[(1 if fixed else nblk, B)](
        d, r, part, part_n, g, stats, nonfinite, D, B, nblk, p.weight, p.ratio, p.max_weight, p.eps,
        out_max, BALANCED=bool(p.balanced), COMBINE=not fixed, BLOCK_SIZE=block, ITERS=iters,
        NBLK_P2=triton.next_power_of_2(nblk),
    )  # fmt: skip
    return _cast_out(g, p.g_dmd.dtype), stats, nonfinite


# ----------------------------------------------------------------------------- backend table


def _grid_batch_check(*, device: torch.device, batch: int = 1, **_: object) -> list[str]:
    """GPU grids put the batch on the y dimension, which holds at most 65535 blocks."""
    if device.type == "cuda" and batch > 65535:
        return [f"batch {batch} > 65535 (grid y-dimension limit)"]
    return []


BACKENDS: OpBackends = fused_backends(
    OP,
    reward_grad_fwd_torch,
    reward_grad_fwd_cpp,
    reward_grad_fwd_cuda,
    reward_grad_fwd_triton,
    cuda_checks=(_grid_batch_check,),
    triton_checks=(_grid_batch_check,),
)


# ----------------------------------------------------------------------------- custom op


def _run(p: RewardGradInputs, backend: str) -> _Result:
    result: _Result = BACKENDS.impls[backend].fn(p)
    return result


def _stats_dtype(g_dmd: Tensor, g_reward: Tensor) -> torch.dtype:
    dt = torch.promote_types(g_dmd.dtype, g_reward.dtype)
    return torch.float64 if dt == torch.float64 else torch.float32


@torch.library.custom_op("dmdr_fast::reward_grad_combine", mutates_args=())
def _reward_grad_combine_op(
    g_dmd: Tensor,
    g_reward: Tensor,
    balanced: bool,
    weight: float,
    ratio: float,
    max_weight: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run(RewardGradInputs(g_dmd, g_reward, balanced, weight, ratio, max_weight, eps), backend)


@_reward_grad_combine_op.register_fake
def _(
    g_dmd: Tensor,
    g_reward: Tensor,
    balanced: bool,
    weight: float,
    ratio: float,
    max_weight: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    B = g_dmd.shape[0]
    return (
        g_dmd.new_empty(g_dmd.shape),
        g_dmd.new_empty((4, B), dtype=_stats_dtype(g_dmd, g_reward)),
        g_dmd.new_empty((B,), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------- public API


def _validate(
    g_dmd: object,
    g_reward: object,
    mode: object,
    weight: object,
    ratio: object,
    max_weight: object,
    eps: object,
) -> RewardGradInputs:
    """Check every argument (messages name it) and build the record (detached tensors, floats)."""
    g_dmd = check_float_tensor(OP, "g_dmd", g_dmd)
    g_reward = check_float_tensor(OP, "g_reward", g_reward)
    if g_dmd.dim() < 1 or g_dmd.shape[0] == 0:
        raise ValueError(
            f"{OP}: `g_dmd` must have shape (B, ...) with B >= 1, got {tuple(g_dmd.shape)} (empty batch)"
        )
    if g_dmd.numel() == 0:
        raise ValueError(f"{OP}: `g_dmd` has no elements per sample, shape {tuple(g_dmd.shape)}")
    check_same_shape(OP, "g_dmd", g_dmd, g_reward=g_reward)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{OP}: `mode` must be 'fixed' or 'balanced', got {mode!r}")
    # Scalars are used in float32 by the fused kernels: "finite" means finite in float32.
    if not is_number(weight) or not abs(weight) <= _F32_MAX:
        raise ValueError(f"{OP}: `weight` must be a finite number (|weight| <= 3.4e38), got {weight!r}")
    if not is_number(ratio) or not 0 <= ratio <= _F32_MAX:
        raise ValueError(f"{OP}: `ratio` must be a finite number >= 0, got {ratio!r}")
    if not is_number(max_weight) or not max_weight >= 0:
        raise ValueError(f"{OP}: `max_weight` must be a number >= 0 (math.inf: no cap), got {max_weight!r}")
    if not is_number(eps) or not _F32_TINY <= eps <= _F32_MAX:
        raise ValueError(
            f"{OP}: `eps` must be a finite number > 0 (at least 1.2e-38, the smallest normal float32: "
            f"the kernels compute in float32), got {eps!r}"
        )
    check_same_device(OP, g_dmd=g_dmd, g_reward=g_reward)
    return RewardGradInputs(
        g_dmd.detach(), g_reward.detach(), mode == "balanced",
        float(weight), float(ratio), float(max_weight), float(eps),
    )  # fmt: skip


def reward_grad_combine(
    g_dmd: Tensor,
    g_reward: Tensor,
    *,
    mode: str = "fixed",
    weight: float = 1.0,
    ratio: float = 1.0,
    max_weight: float = math.inf,
    eps: float = 1e-12,
    backend: str | None = None,
) -> tuple[Tensor, RewardGradStats]:
    """Combine the DMD direction with the reward gradient on x0, per sample (docs/method.md §7).

    Per sample ``i`` (all dimensions after the first flattened), with ``r_i`` = ``g_reward_i``
    whose NaN, +Inf and −Inf entries are replaced by 0::

        a_i = ‖g_dmd_i‖₂,   b_i = ‖r_i‖₂,   cos_i = ⟨g_dmd_i, r_i⟩ / (a_i·b_i)   (0 if a_i·b_i = 0)
        w_i = weight                                   (mode="fixed", the paper's setting)
            = min(max_weight, ratio·a_i / (b_i + eps))   (mode="balanced": ‖w_i·r_i‖ ≈ ratio·a_i)
        g_i = g_dmd_i + w_i·r_i

    The reward gradient is sanitised (a reward model may return NaN/Inf for a few samples), the
    DMD direction is not: ``g_dmd`` must be finite, which :func:`dmdr_fast.ops.dmd_loss`
    guarantees for its direction. There is no autograd: the inputs are gradients, the op reads
    them detached and its outputs do not require grad.

    Args:
        g_dmd: (B, ...) DMD direction, B >= 1, at least one element per sample; float32, float16,
            bfloat16 or float64 (float64: torch backend only).
        g_reward: (B, ...) reward gradient, same shape and device; its dtype may differ (the
            computation then runs in the promoted dtype).
        mode: ``"fixed"`` or ``"balanced"``.
        weight: weight of mode ``"fixed"`` (finite; ignored in mode ``"balanced"``).
        ratio: mode ``"balanced"``: target ratio of ``‖w·r‖`` to ``‖g_dmd‖`` (finite, >= 0).
        max_weight: mode ``"balanced"``: cap on the weight (>= 0; ``math.inf``: no cap). Ignored
            in mode ``"fixed"``.
        eps: mode ``"balanced"``: added to ``‖r‖`` (> 0). A sample with ``r = 0`` gets the
            weight ``min(max_weight, ratio·a/eps)``, and ``g = g_dmd``.
        backend: ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``; None picks automatically
            (see :mod:`dmdr_fast.backends`).

    Accumulation is float32 (float64 when the promoted dtype is float64). Non-contiguous inputs
    are copied to contiguous memory. ``g`` is returned in g_dmd's dtype; a value beyond that
    dtype's range saturates at its largest finite value.

    Returns:
        ``(g, stats)``: ``g`` with g_dmd's shape and dtype, and :class:`RewardGradStats` with
        ``dmd_norm``, ``reward_norm``, ``cosine``, ``weight`` (each (B,) float32, float64 when
        the promoted dtype is float64) and ``nonfinite`` ((B,) int64: NaN/±Inf entries of
        ``g_reward`` per sample).

    Raises:
        TypeError: a non-tensor, integer or complex input.
        ValueError: shape, device, mode or scalar errors (the message names the argument).
        BackendUnavailableError: the requested backend cannot run these inputs.
    """
    p = _validate(g_dmd, g_reward, mode, weight, ratio, max_weight, eps)
    dtypes = [p.g_dmd.dtype, p.g_reward.dtype]
    name = select_backend(
        BACKENDS, backend, p.device.type, dtypes, device=p.device, batch=p.g_dmd.shape[0]
    ).name
    if torch.compiler.is_compiling():
        g, stats, nonfinite = _reward_grad_combine_op(*p, name)
    else:  # eager: straight to the launcher, skipping the custom-op dispatcher's overhead
        g, stats, nonfinite = _run(p, name)
    return g, RewardGradStats(stats[0], stats[1], stats[2], stats[3], nonfinite)
