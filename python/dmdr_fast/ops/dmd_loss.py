"""The fused DMD score-difference op: ``dmdr_fast.ops.dmd_loss``.

Order of this file (Liger-style): backend launchers (torch reference, C++ CPU, CUDA, Triton) →
backend registration → the ``dmdr_fast::dmd_loss`` custom op with its fake and autograd →
``DmdLossFunction`` (the low-overhead eager path) → the public wrapper with validation.

Memory: the forward writes the direction ``g`` (x0's shape and dtype) and autograd saves it; that
is the only tensor of x0's size the op adds. Backward is ``g · (grad / numel)``, a single
elementwise multiply, so no backward kernel is needed. The CUDA and Triton launchers also use a
workspace of 2·B·blocks floats for partial sums.
"""

from __future__ import annotations

import torch

from dmdr_fast import backends
from dmdr_fast._native import get_native, get_triton_kernels
from dmdr_fast.ops._common import (
    OUT_MAX,
    check_float_tensor,
    check_same_device,
    check_same_shape,
    dtype_code,
    on_input_device,
    promote,
    register_fused_backends,
    triton_grid,
)
from dmdr_fast.ops.reference import dmd_loss_ref

__all__ = ["DmdLossFunction", "dmd_loss"]

OP = "dmd_loss"
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- launchers
# Every launcher takes validated tensors and returns (loss, g): loss a 0-dim float32 tensor
# (float64 for all-float64 inputs on the torch backend), g with x0's shape and dtype, finite.


def _finite_in(g: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to ``dtype`` and clamp ±Inf to its finite range (a float32 ±max overflows 16-bit types)."""
    return g if g.dtype == dtype else torch.nan_to_num(g.to(dtype))


def dmd_loss_fwd_torch(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps):
    """Reference backend: :func:`dmdr_fast.ops.reference.dmd_loss_ref`."""
    loss, g = dmd_loss_ref(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)
    return loss, _finite_in(g, x0.dtype)


def _flat_inputs(x0, x_t, t, v_fake, v_cond, v_uncond):
    """(B, D) contiguous views in one common dtype (kernels take a single element type)."""
    dt = promote([x0, x_t, v_fake, v_cond, v_uncond])
    B = x0.shape[0]

    def flat(x):
        return None if x is None else x.detach().to(dt).contiguous().view(B, -1)

    return dt, [flat(x) for x in (x0, x_t, v_fake, v_cond, v_uncond)], t.detach().float().contiguous()


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _outputs(x0: Tensor, dt: torch.dtype, B: int) -> tuple[Tensor, Tensor, Tensor]:
    """g (x0's shape, kernel dtype), per-sample stats (norm, sumsq) and the 0-dim loss."""
    g = torch.empty(x0.shape, dtype=dt, device=x0.device)
    stats = torch.empty(2, B, dtype=torch.float32, device=x0.device)
    loss = torch.empty((), dtype=torch.float32, device=x0.device)
    return g, stats, loss


def dmd_loss_fwd_cpp(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps):
    """Fused C++ CPU kernel (OpenMP, threads = ``torch.get_num_threads()``)."""
    dt, (a, s, f, c, u), tf = _flat_inputs(x0, x_t, t, v_fake, v_cond, v_uncond)
    B, D = a.shape
    g, stats, loss = _outputs(x0, dt, B)
    get_native().dmd_loss_fwd_cpu(
        a.data_ptr(), s.data_ptr(), tf.data_ptr(), f.data_ptr(), c.data_ptr(), _ptr(u),
        g.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), loss.data_ptr(),
        B, D, float(guidance), float(eps), dtype_code(dt), torch.get_num_threads(),
    )  # fmt: skip
    return loss, _finite_in(g, x0.dtype)


def dmd_loss_fwd_cuda(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps):
    """Fused CUDA kernels (two launches on the current stream)."""
    dt, (a, s, f, c, u), tf = _flat_inputs(x0, x_t, t, v_fake, v_cond, v_uncond)
    B, D = a.shape
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    native = get_native()
    g, stats, loss = _outputs(x0, dt, B)
    ws_bytes = native.dmd_loss_workspace_bytes(B, D, device)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device)
    native.dmd_loss_fwd_cuda(
        a.data_ptr(), s.data_ptr(), tf.data_ptr(), f.data_ptr(), c.data_ptr(), _ptr(u),
        g.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), loss.data_ptr(),
        B, D, float(guidance), float(eps), dtype_code(dt),
        ws.data_ptr(), ws_bytes, device, torch.cuda.current_stream(a.device).cuda_stream,
    )  # fmt: skip
    return loss, _finite_in(g, x0.dtype)


@on_input_device
def dmd_loss_fwd_triton(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps):
    """Fused Triton kernels (two launches); on CPU only under TRITON_INTERPRET=1."""
    kernels = get_triton_kernels("dmd_loss")
    import triton

    dt, (a, s, f, c, u), tf = _flat_inputs(x0, x_t, t, v_fake, v_cond, v_uncond)
    B, D = a.shape
    block, iters, nblk = triton_grid(B, D, a.device)
    g = torch.empty(x0.shape, dtype=dt, device=x0.device)
    part = torch.empty(2, B, nblk, dtype=torch.float32, device=a.device)
    norm = torch.empty(B, dtype=torch.float32, device=a.device)
    has_u = u is not None
    grid = (nblk, B)
    kernels._dmd_loss_reduce_kernel[grid](
        a, s, tf, c, u if has_u else c, part[0], D, float(guidance),
        HAS_UNCOND=has_u, BLOCK_SIZE=block, ITERS=iters,
    )  # fmt: skip
    kernels._dmd_loss_fwd_kernel[grid](
        s, tf, f, c, u if has_u else c, part[0], part[1], g, norm, D, float(guidance), float(eps),
        OUT_MAX[dt], HAS_UNCOND=has_u, BLOCK_SIZE=block, ITERS=iters,
        NBLK_P2=triton.next_power_of_2(nblk),
    )  # fmt: skip
    loss = 0.5 * part[1].sum(dtype=torch.float64) / (B * D)
    return loss.float(), _finite_in(g, x0.dtype)


# ----------------------------------------------------------------------------- registration


register_fused_backends(OP, dmd_loss_fwd_torch, dmd_loss_fwd_cpp, dmd_loss_fwd_cuda, dmd_loss_fwd_triton)


# ----------------------------------------------------------------------------- custom op + autograd


def _run(backend, x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps):
    return backends.get_backends(OP)[backend].fn(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)


def _grad_x0(g: Tensor, grad_loss: Tensor) -> Tensor:
    """∂loss/∂x0 = g / numel(x0), times the incoming gradient (one elementwise multiply).

    g is finite in its dtype, so the product is finite unless the incoming gradient exceeds
    numel(x0) in magnitude (e.g. an fp16 loss scaler): then ±Inf is the right signal for the
    scaler to skip the step, and it is not masked here.
    """
    return g * (grad_loss / g.numel()).to(g.dtype)


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
    return _run(backend, x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)


@_dmd_loss_op.register_fake
def _(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps, backend):
    all64 = all(x.dtype == torch.float64 for x in (x0, x_t, v_fake, v_cond, v_uncond) if x is not None)
    return x0.new_empty((), dtype=torch.float64 if all64 else torch.float32), torch.empty_like(x0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_g):
    (g,) = ctx.saved_tensors
    return _grad_x0(g, grad_loss), None, None, None, None, None, None, None, None


_dmd_loss_op.register_autograd(_backward, setup_context=_setup_context)


class DmdLossFunction(torch.autograd.Function):
    """Eager autograd path (skips the custom-op dispatcher's overhead; same math and saving)."""

    @staticmethod
    def forward(ctx, x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps, backend):
        loss, g = _run(backend, x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(g)
        return loss, g

    @staticmethod
    def backward(ctx, grad_loss, grad_g):
        (g,) = ctx.saved_tensors
        return _grad_x0(g, grad_loss), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API


def _validate(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps) -> torch.device:
    for name, x in (("x0", x0), ("x_t", x_t), ("t", t), ("v_fake", v_fake), ("v_cond", v_cond)):
        check_float_tensor(OP, name, x)
    if v_uncond is not None:
        check_float_tensor(OP, "v_uncond", v_uncond)
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
    return check_same_device(OP, x0=x0, x_t=x_t, t=t, v_fake=v_fake, v_cond=v_cond, v_uncond=v_uncond)


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
    """DMD score-difference loss with a fused gradient (DESIGN §1, step 3).

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
    device = _validate(x0, x_t, t, v_fake, v_cond, v_uncond, guidance, eps)
    dtypes = [x.dtype for x in (x0, x_t, v_fake, v_cond, v_uncond) if x is not None]
    impl = backends.select_backend(OP, backend, device.type, dtypes, device=device)
    args = (x0, x_t, t, v_fake, v_cond, v_uncond, float(guidance), float(eps), impl.name)
    if torch.compiler.is_compiling():
        loss, g = _dmd_loss_op(*args)
    else:
        loss, g = DmdLossFunction.apply(*args)
    return (loss, g.detach()) if return_direction else loss
