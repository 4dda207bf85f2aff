"""The fused DMD score-difference op: ``dmdr_fast.ops.dmd_loss`` (docs/method.md §5.4).

Order of this file (Liger-style, docs/architecture.md §5): the input record → backend launchers
(torch reference, C++ CPU, CUDA, Triton) → the backend table → the ``dmdr_fast::dmd_loss``
custom op with its fake and autograd → ``DmdLossFunction`` (the low-overhead eager path, same
backward) → the public wrapper with validation.

Memory: the forward writes the direction ``g`` (x0's shape and dtype) and autograd saves it; that
is the only tensor of x0's size the op adds. Backward is ``g · (grad / numel)``, a single
elementwise multiply, so no backward kernel is needed. The CUDA and Triton launchers also use a
workspace of 2·B·blocks floats for partial sums.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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
    on_input_device,
    promote,
    triton_grid,
)
from dmdr_fast.ops.reference import dmd_loss_ref

__all__ = ["BACKENDS", "DmdLossFunction", "DmdLossInputs", "dmd_loss"]

OP = "dmd_loss"
Tensor = torch.Tensor


class DmdLossInputs(NamedTuple):
    """Validated inputs of one ``dmd_loss`` call, the Python twin of the C++ ``DmdLossParams``
    (csrc/include/dmdr_fast/dmd_loss.h). Built once (by validation, or inside the custom op from
    its flat arguments) and passed whole to the launchers. Field order = the op's argument order.
    """

    x0: Tensor  # (B, ...) generator output
    x_t: Tensor  # (B, ...) renoised sample
    t: Tensor  # (B,) renoise times
    v_fake: Tensor  # (B, ...) fake-score velocity
    v_cond: Tensor  # (B, ...) conditional real velocity
    v_uncond: Tensor | None  # (B, ...) unconditional real velocity, or None (no CFG)
    guidance: float
    eps: float

    @property
    def device(self) -> torch.device:
        return self.x0.device

    def velocities_and_samples(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The tensors of x0's shape: x0, x_t, v_fake, v_cond, v_uncond."""
        return self.x0, self.x_t, self.v_fake, self.v_cond, self.v_uncond

    def dtypes(self) -> list[torch.dtype]:
        """Dtypes of the floating inputs of x0's shape (what the backends' dtype rules look at)."""
        return [x.dtype for x in self.velocities_and_samples() if x is not None]


# ----------------------------------------------------------------------------- launchers
# Every launcher takes a DmdLossInputs and returns (loss, g): loss a 0-dim float32 tensor (float64
# for all-float64 inputs on the torch backend), g with x0's shape and dtype, finite.


def _finite_in(g: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to ``dtype`` and clamp ±Inf to its finite range (a float32 ±max overflows 16-bit types)."""
    return g if g.dtype == dtype else torch.nan_to_num(g.to(dtype))


def dmd_loss_fwd_torch(p: DmdLossInputs) -> tuple[Tensor, Tensor]:
    """Reference backend: :func:`dmdr_fast.ops.reference.dmd_loss_ref`."""
    loss, g = dmd_loss_ref(*p)
    return loss, _finite_in(g, p.x0.dtype)


class _Flat(NamedTuple):
    """(B, D) contiguous views in one common dtype (kernels take a single element type)."""

    dtype: torch.dtype
    x0: Tensor
    x_t: Tensor
    v_fake: Tensor
    v_cond: Tensor
    v_uncond: Tensor | None
    t: Tensor  # (B,) float32

    @property
    def shape(self) -> tuple[int, int]:
        B, D = self.x0.shape
        return B, D


def _flat_inputs(p: DmdLossInputs) -> _Flat:
    dt = promote(p.velocities_and_samples())
    B = p.x0.shape[0]

    def flat(x: Tensor) -> Tensor:
        return x.detach().to(dt).contiguous().view(B, -1)

    u = None if p.v_uncond is None else flat(p.v_uncond)
    t = p.t.detach().float().contiguous()
    return _Flat(dt, flat(p.x0), flat(p.x_t), flat(p.v_fake), flat(p.v_cond), u, t)


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _outputs(x0: Tensor, dt: torch.dtype, B: int) -> tuple[Tensor, Tensor, Tensor]:
    """g (x0's shape, kernel dtype), per-sample stats (norm, sumsq) and the 0-dim loss."""
    g = torch.empty(x0.shape, dtype=dt, device=x0.device)
    stats = torch.empty(2, B, dtype=torch.float32, device=x0.device)
    loss = torch.empty((), dtype=torch.float32, device=x0.device)
    return g, stats, loss


def dmd_loss_fwd_cpp(p: DmdLossInputs) -> tuple[Tensor, Tensor]:
    """Fused C++ CPU kernel (OpenMP, threads = ``torch.get_num_threads()``)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    f = _flat_inputs(p)
    B, D = f.shape
    g, stats, loss = _outputs(p.x0, f.dtype, B)
    _C.dmd_loss_fwd_cpu(
        f.x0.data_ptr(), f.x_t.data_ptr(), f.t.data_ptr(), f.v_fake.data_ptr(), f.v_cond.data_ptr(),
        _ptr(f.v_uncond), g.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), loss.data_ptr(),
        B, D, float(p.guidance), float(p.eps), dtype_code(f.dtype), torch.get_num_threads(),
    )  # fmt: skip
    return loss, _finite_in(g, p.x0.dtype)


def dmd_loss_fwd_cuda(p: DmdLossInputs) -> tuple[Tensor, Tensor]:
    """Fused CUDA kernels (two launches on the current stream)."""
    from dmdr_fast import _C  # loaded and admitted by the backend's availability check

    f = _flat_inputs(p)
    B, D = f.shape
    dev = f.x0.device
    device = dev.index if dev.index is not None else torch.cuda.current_device()
    g, stats, loss = _outputs(p.x0, f.dtype, B)
    ws_bytes = _C.dmd_loss_workspace_bytes(B, D, device)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    _C.dmd_loss_fwd_cuda(
        f.x0.data_ptr(), f.x_t.data_ptr(), f.t.data_ptr(), f.v_fake.data_ptr(), f.v_cond.data_ptr(),
        _ptr(f.v_uncond), g.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), loss.data_ptr(),
        B, D, float(p.guidance), float(p.eps), dtype_code(f.dtype),
        ws.data_ptr(), ws_bytes, device, torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return loss, _finite_in(g, p.x0.dtype)


@on_input_device
def dmd_loss_fwd_triton(p: DmdLossInputs) -> tuple[Tensor, Tensor]:
    """Fused Triton kernels (two launches); on CPU only under TRITON_INTERPRET=1."""
    kernels = get_triton_kernels("dmd_loss")
    import triton

    f = _flat_inputs(p)
    B, D = f.shape
    dev = f.x0.device
    block, iters, nblk = triton_grid(B, D, dev)
    g = torch.empty(p.x0.shape, dtype=f.dtype, device=p.x0.device)
    part = torch.empty(2, B, nblk, dtype=torch.float32, device=dev)
    norm = torch.empty(B, dtype=torch.float32, device=dev)
    has_u = f.v_uncond is not None
    u = f.v_uncond if f.v_uncond is not None else f.v_cond
    grid = (nblk, B)
    kernels._dmd_loss_reduce_kernel[grid](
        f.x0, f.x_t, f.t, f.v_cond, u, part[0], D, float(p.guidance),
        HAS_UNCOND=has_u, BLOCK_SIZE=block, ITERS=iters,
    )  # fmt: skip
    kernels._dmd_loss_fwd_kernel[grid](
        f.x_t, f.t, f.v_fake, f.v_cond, u, part[0], part[1], g, norm, D, float(p.guidance),
        float(p.eps), OUT_MAX[f.dtype], HAS_UNCOND=has_u, BLOCK_SIZE=block, ITERS=iters,
        NBLK_P2=triton.next_power_of_2(nblk),
    )  # fmt: skip
    loss = 0.5 * part[1].sum(dtype=torch.float64) / (B * D)
    return loss.float(), _finite_in(g, p.x0.dtype)


# ----------------------------------------------------------------------------- backend table

BACKENDS: OpBackends = fused_backends(
    OP, dmd_loss_fwd_torch, dmd_loss_fwd_cpp, dmd_loss_fwd_cuda, dmd_loss_fwd_triton
)


# ----------------------------------------------------------------------------- custom op + autograd


def _run(p: DmdLossInputs, backend: str) -> tuple[Tensor, Tensor]:
    result: tuple[Tensor, Tensor] = BACKENDS.impls[backend].fn(p)
    return result


@torch.library.custom_op("dmdr_fast::dmd_loss", mutates_args=())
def _dmd_loss_op(
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    v_fake: Tensor,
    v_cond: Tensor,
    v_uncond: Tensor | None,
    guidance: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _run(DmdLossInputs(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps), backend)


@_dmd_loss_op.register_fake
def _(
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    v_fake: Tensor,
    v_cond: Tensor,
    v_uncond: Tensor | None,
    guidance: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    all64 = all(x.dtype == torch.float64 for x in (x0, x_t, v_fake, v_cond, v_uncond) if x is not None)
    return x0.new_empty((), dtype=torch.float64 if all64 else torch.float32), torch.empty_like(x0)


def _backward(ctx: Any, grad_loss: Tensor, grad_g: Tensor | None) -> tuple[Tensor | None, ...]:
    """The one backward of the op (custom op and :class:`DmdLossFunction`).

    ∂loss/∂x0 = g / numel(x0), times the incoming gradient (one elementwise multiply); nothing
    for the other eight arguments. g is finite in its dtype, so the product is finite unless the
    incoming gradient exceeds numel(x0) in magnitude (e.g. an fp16 loss scaler): then ±Inf is the
    right signal for the scaler to skip the step, and it is not masked here.
    """
    (g,) = ctx.saved_tensors
    grad_x0 = g * (grad_loss / g.numel()).to(g.dtype)
    return grad_x0, None, None, None, None, None, None, None, None


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])


_dmd_loss_op.register_autograd(_backward, setup_context=_setup_context)


class DmdLossFunction(torch.autograd.Function):
    """Eager autograd path (skips the custom-op dispatcher's overhead; same math, saving and
    backward as the custom op)."""

    @staticmethod
    def forward(
        ctx: Any,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        v_fake: Tensor,
        v_cond: Tensor,
        v_uncond: Tensor | None,
        guidance: float,
        eps: float,
        backend: str,
    ) -> tuple[Tensor, Tensor]:
        loss, g = _run(DmdLossInputs(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps), backend)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(g)
        return loss, g

    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------- public API


def _validate(
    x0: object,
    x_t: object,
    t: object,
    v_fake: object,
    v_cond: object,
    v_uncond: object,
    guidance: object,
    eps: object,
) -> DmdLossInputs:
    """Check every argument (messages name it) and build the record (scalars as Python floats)."""
    x0 = check_float_tensor(OP, "x0", x0)
    x_t = check_float_tensor(OP, "x_t", x_t)
    t = check_float_tensor(OP, "t", t)
    v_fake = check_float_tensor(OP, "v_fake", v_fake)
    v_cond = check_float_tensor(OP, "v_cond", v_cond)
    v_uncond = None if v_uncond is None else check_float_tensor(OP, "v_uncond", v_uncond)
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(
            f"{OP}: `x0` must have shape (B, ...) with B >= 1, got {tuple(x0.shape)} (empty batch)"
        )
    if x0.numel() == 0:
        raise ValueError(f"{OP}: `x0` has no elements per sample, shape {tuple(x0.shape)}")
    check_same_shape(OP, "x0", x0, x_t=x_t, v_fake=v_fake, v_cond=v_cond, v_uncond=v_uncond)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"{OP}: `t` must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    for name, x in (("x_t", x_t), ("t", t), ("v_fake", v_fake), ("v_cond", v_cond), ("v_uncond", v_uncond)):
        if x is not None and x.requires_grad:
            raise ValueError(
                f"{OP}: `{name}` requires grad, but only `x0` receives a gradient; pass `{name}.detach()` "
                "(the score networks are evaluated without grad in DMD)"
            )
    if not isinstance(guidance, (int, float)) or guidance != guidance or abs(guidance) == float("inf"):
        raise ValueError(f"{OP}: `guidance` must be a finite number, got {guidance!r}")
    if not isinstance(eps, (int, float)) or not (eps >= 0) or eps == float("inf"):
        raise ValueError(f"{OP}: `eps` must be a finite number >= 0, got {eps!r}")
    check_same_device(OP, x0=x0, x_t=x_t, t=t, v_fake=v_fake, v_cond=v_cond, v_uncond=v_uncond)
    return DmdLossInputs(x0, x_t, t, v_fake, v_cond, v_uncond, float(guidance), float(eps))


def dmd_loss(
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    v_fake: Tensor,
    v_cond: Tensor,
    v_uncond: Tensor | None = None,
    guidance: float = 1.0,
    eps: float = 1e-8,
    *,
    backend: str | None = None,
    return_direction: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DMD score-difference loss with a fused gradient (docs/method.md §5.4).

    With ``v_real = v_uncond + guidance·(v_cond − v_uncond)`` (``v_cond`` when ``v_uncond`` is
    None), ``x̂0_real = x_t − t·v_real`` and ``x̂0_fake = x_t − t·v_fake``::

        g    = nan_to_num((x̂0_fake − x̂0_real) / (mean_per_sample|x0 − x̂0_real| + eps))
        loss = ½·mean(g²),   ∂loss/∂x0 = g / x0.numel()

    i.e. the gradient of ``½·MSE(x0, sg(x0 − g))``. Only ``x0`` receives a gradient.

    Args:
        x0: (B, ...) generator output; float32/float16/bfloat16 (float64: torch backend only).
        x_t: (B, ...) renoised sample.
        t: (B,) renoise times in [0, 1].
        v_fake: (B, ...) fake-score (critic) velocity at ``(x_t, t)``.
        v_cond: (B, ...) conditional real-score velocity.
        v_uncond: (B, ...) unconditional real velocity for CFG, or None.
        guidance: CFG scale (ignored without ``v_uncond``).
        eps: added to the per-sample normaliser.
        backend: ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``; None picks automatically
            (see :mod:`dmdr_fast.backends`).
        return_direction: also return ``g`` (detached, x0's shape and dtype).

    Inputs may have different floating dtypes; fused kernels then work on copies promoted to a
    common dtype. Non-contiguous inputs are accepted and copied to contiguous memory. All
    arithmetic is float32.

    Returns:
        The loss, a 0-dim float32 tensor (float64 when every input is float64), or
        ``(loss, g)`` with ``return_direction=True``.

    Raises:
        TypeError: a non-tensor, integer or complex input.
        ValueError: shape, device or argument errors (the message names the argument).
        BackendUnavailableError: the requested backend cannot run these inputs.
    """
    p = _validate(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)
    name = select_backend(BACKENDS, backend, p.device.type, p.dtypes(), device=p.device).name
    if torch.compiler.is_compiling():
        loss, g = _dmd_loss_op(*p, name)
    else:
        loss, g = DmdLossFunction.apply(*p, name)
    return (loss, g.detach()) if return_direction else loss
