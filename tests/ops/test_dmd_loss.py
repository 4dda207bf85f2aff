"""Tests of dmdr_fast.ops.dmd_loss: the reference against an independent derivation, every
available backend against the reference, gradients, NaN/Inf handling and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.utils import assert_close_rel_to_torch

from dmdr_fast import backends
from dmdr_fast.ops import dmd_loss
from dmdr_fast.ops.dmd_loss import BACKENDS
from dmdr_fast.ops.reference import dmd_loss_ref

CPU_BACKENDS = ["torch", "cpp", "triton"]
SHAPES = [(1, 1, 7, 13), (3, 4, 16, 16), (5, 16, 33, 17)]


def _available(backend: str, dtype=torch.float32) -> list[str]:
    impl = BACKENDS.impls[backend]
    return impl.not_supported_reasons("cpu", [dtype], device=torch.device("cpu"))


def _skip_unless(backend: str, dtype=torch.float32) -> None:
    reasons = _available(backend, dtype)
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")


def make_inputs(shape, dtype=torch.float32, uncond=True, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]

    def rnd():
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)

    x0 = rnd()
    eps = rnd()
    t = torch.rand(B, generator=gen, dtype=torch.float64).to(torch.float32)
    x_t = (
        (1 - t.double().view(-1, *[1] * (len(shape) - 1))) * x0.double()
        + t.double().view(-1, *[1] * (len(shape) - 1)) * eps.double()
    ).to(dtype)
    v_fake, v_cond = rnd(), rnd()
    v_uncond = rnd() if uncond else None
    return x0, x_t, t, v_fake, v_cond, v_uncond


def numpy_dmd(x0, x_t, t, v_fake, v_cond, v_uncond, w, eps):
    """Independent float64 derivation, per sample with numpy, using the algebraic form
    x̂0_fake − x̂0_real = t·(v_real − v_fake) instead of the literal one of the reference."""
    x0, x_t, v_fake, v_cond = (a.double().numpy().reshape(a.shape[0], -1) for a in (x0, x_t, v_fake, v_cond))
    v_uncond = None if v_uncond is None else v_uncond.double().numpy().reshape(x0.shape)
    t = t.double().numpy()
    g = np.empty_like(x0)
    for b in range(x0.shape[0]):
        v_real = v_cond[b] if v_uncond is None else (1 - w) * v_uncond[b] + w * v_cond[b]
        residual = x0[b] - (x_t[b] - t[b] * v_real)
        norm = np.mean(np.abs(residual)) + eps
        g[b] = t[b] * (v_real - v_fake[b]) / norm
    return 0.5 * np.mean(g**2), g


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("uncond,w", [(False, 1.0), (True, 1.0), (True, 4.5)])
def test_reference_matches_independent_float64(shape, uncond, w):
    inputs = make_inputs(shape, torch.float64, uncond)
    loss, g = dmd_loss_ref(*inputs, guidance=w, eps=1e-8)
    loss_np, g_np = numpy_dmd(*inputs, w, 1e-8)
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), loss_np, rtol=1e-12)
    np.testing.assert_allclose(g.numpy().reshape(g_np.shape), g_np, rtol=1e-10, atol=1e-12)


def test_reference_gradcheck_matches_dmd_surrogate():
    """The op's x0-gradient is the derivative of the DMD surrogate ½·mean((x0' − T)²) with the
    target T = sg(x0 − g) frozen at the evaluation point (docs/method.md §5.4). gradcheck compares our
    analytical backward against finite differences of that surrogate in float64."""
    x0, x_t, t, v_fake, v_cond, v_uncond = make_inputs((3, 2, 5, 3), torch.float64)
    _, g = dmd_loss_ref(x0, x_t, t, v_fake, v_cond, v_uncond, guidance=2.0)
    target = (x0 - g).detach()

    def surrogate_with_op_gradient(x):
        op_loss = dmd_loss(x, x_t, t, v_fake, v_cond, v_uncond, 2.0, backend="torch")
        surrogate = 0.5 * ((x - target) ** 2).mean()
        # value of the surrogate, gradient of the op
        return surrogate.detach() + op_loss - op_loss.detach()

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate_with_op_gradient, (x,), eps=1e-6, atol=1e-9, rtol=1e-7)


# ----------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("uncond,w", [(False, 1.0), (True, 3.0)])
def test_backend_matches_reference(backend, shape, dtype, uncond, w):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip(
            "the Triton interpreter mishandles 16-bit arithmetic (docs/architecture.md §6): fp32 only on CPU"
        )
    _skip_unless(backend, dtype)
    inputs = make_inputs(shape, dtype, uncond)
    x0 = inputs[0].clone().requires_grad_(True)
    loss, g = dmd_loss(x0, *inputs[1:], guidance=w, backend=backend, return_direction=True)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert g.dtype == dtype and g.shape == x0.shape

    ref_loss, ref_g = dmd_loss_ref(*(a.double() if a is not None else None for a in inputs), guidance=w)
    pt_loss, pt_g = dmd_loss_ref(*inputs, guidance=w, upcast=False)
    # fp32 arithmetic has ~1e-7 relative error; atol covers rounding that PyTorch happened to avoid.
    atol = 4 * torch.finfo(dtype).eps * ref_g.abs().max().item()
    assert_close_rel_to_torch(g, ref_g, pt_g, atol=atol, name=f"{backend} g")
    assert_close_rel_to_torch(loss, ref_loss, pt_loss, atol=1e-6 * ref_loss.item(), name=f"{backend} loss")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_backend_is_accurate(backend):
    """Beyond the relative rule: fused fp32 kernels agree with the float64 reference to ~1e-6."""
    _skip_unless(backend)
    inputs = make_inputs((3, 4, 16, 16), torch.float32)
    loss, g = dmd_loss(*inputs, guidance=2.0, backend=backend, return_direction=True)
    ref_loss, ref_g = dmd_loss_ref(*(a.double() for a in inputs), guidance=2.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-6 * ref_g.abs().max().item())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_dtypes(backend):
    _skip_unless(backend)
    x0, x_t, t, vf, vc, vu = make_inputs((3, 2, 9, 11), torch.float32)
    mixed = (
        x0,
        x_t.bfloat16() if backend == "cpp" else x_t,
        t,
        vf.half() if backend == "cpp" else vf,
        vc,
        vu,
    )
    loss, g = dmd_loss(*mixed, guidance=2.0, backend=backend, return_direction=True)
    ref_loss, ref_g = dmd_loss(*mixed, guidance=2.0, backend="torch", return_direction=True)
    assert g.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_direction_over_numel(backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only")
    _skip_unless(backend, dtype)
    x0, *rest = make_inputs((3, 4, 7, 5), dtype)
    x0 = x0.clone().requires_grad_(True)
    loss, g = dmd_loss(x0, *rest, guidance=1.5, backend=backend, return_direction=True)
    (3.0 * loss).backward()
    expected = (g.double() * 3.0 / x0.numel()).to(dtype)
    torch.testing.assert_close(x0.grad, expected, rtol=torch.finfo(dtype).eps * 2, atol=0)
    # and it is the gradient of ½·MSE(x0, sg(x0 − g)) computed by autograd in float64
    x64 = x0.detach().double().requires_grad_(True)
    (3.0 * 0.5 * torch.nn.functional.mse_loss(x64, (x64 - g.double()).detach())).backward()
    torch.testing.assert_close(x0.grad.double(), x64.grad, rtol=torch.finfo(dtype).eps * 2, atol=0)


def test_noncontiguous_inputs_work():
    x0, x_t, t, vf, vc, vu = make_inputs((3, 8, 6, 5), torch.float32)
    nc = [a.transpose(-1, -2).contiguous().transpose(-1, -2) for a in (x0, x_t, vf, vc, vu)]
    assert not nc[0].is_contiguous()
    for backend in ["torch", "cpp", "triton"]:
        if _available(backend):
            continue
        a = dmd_loss(x0, x_t, t, vf, vc, vu, 2.0, backend=backend, return_direction=True)
        b = dmd_loss(nc[0], nc[1], t, nc[2], nc[3], nc[4], 2.0, backend=backend, return_direction=True)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])


# ----------------------------------------------------------------------------- NaN / Inf


def _poisoned(dtype):
    x0, x_t, t, vf, vc, vu = make_inputs((4, 3, 8, 8), dtype)
    vf.view(4, -1)[0, :5] = float("nan")  # NaN in the fake score
    vc.view(4, -1)[1, 7] = float("inf")  # Inf in the real score → d = ±Inf or NaN
    x0.view(4, -1)[2, 3] = float("nan")  # NaN normaliser → whole sample 2 is NaN → 0
    return x0, x_t, t, vf, vc, vu


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_never_reach_loss_or_gradient(backend):
    _skip_unless(backend)
    x0, *rest = _poisoned(torch.float32)
    x0 = x0.clone().requires_grad_(True)
    loss, g = dmd_loss(x0, *rest, guidance=2.0, backend=backend, return_direction=True)
    loss.backward()
    assert not torch.isnan(loss)
    assert torch.isfinite(g).all() and torch.isfinite(x0.grad).all()
    ref_loss, ref_g = dmd_loss_ref(x0, *rest, guidance=2.0)
    assert (g[2] == 0).all()  # NaN normaliser
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter's numpy: g² = Inf
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_normaliser(backend, dtype):
    """x0 == x̂0_real exactly and eps = 0: d/0 = ±Inf → ±max, 0/0 = NaN → 0; the loss may be +Inf
    (g² overflows, as in the reference) but never NaN, and the gradient stays finite."""
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only")
    _skip_unless(backend, dtype)
    # Small integers and t = 0.5 make x0 = x_t − t·v_cond exact in every dtype, so |x0 − x̂0_real| = 0.
    gen = torch.Generator().manual_seed(3)
    x_t, vf, vc = (torch.randint(-8, 9, (2, 3, 5, 5), generator=gen).to(dtype) for _ in range(3))
    t = torch.full((2,), 0.5)
    vf[1] = vc[1]  # sample 1: d = 0 → 0/0
    x0 = (x_t.float() - 0.5 * vc.float()).to(dtype)
    args = [x0, x_t, t, vf, vc]
    x0r = args[0].clone().requires_grad_(True)
    loss, g = dmd_loss(x0r, *args[1:], eps=0.0, backend=backend, return_direction=True)
    loss.backward()
    assert not torch.isnan(loss)
    assert torch.isfinite(g).all() and torch.isfinite(x0r.grad).all()
    assert (g[1] == 0).all()
    ref_loss, ref_g = dmd_loss(args[0], *args[1:], eps=0.0, backend="torch", return_direction=True)
    assert torch.equal(g.abs() == torch.finfo(dtype).max, ref_g.abs() == torch.finfo(dtype).max)
    assert loss.item() == ref_loss.item() or (math.isinf(loss.item()) and math.isinf(ref_loss.item()))


# ----------------------------------------------------------------------------- validation


def _base():
    return list(make_inputs((2, 3, 4, 4), torch.float32))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (
            lambda a: a.__setitem__(1, torch.zeros(2, 3, 4, 5)),
            ValueError,
            "`x_t` must have the shape of `x0`",
        ),
        (lambda a: a.__setitem__(4, torch.zeros(2, 3, 4)), ValueError, "`v_cond` must have the shape"),
        (lambda a: a.__setitem__(5, torch.zeros(1, 3, 4, 4)), ValueError, "`v_uncond` must have the shape"),
        (lambda a: a.__setitem__(2, torch.rand(2, 1)), ValueError, r"`t` must have shape \(B,\)"),
        (lambda a: a.__setitem__(2, torch.rand(3)), ValueError, r"`t` must have shape \(B,\)"),
        (
            lambda a: a.__setitem__(0, torch.zeros(2, 3, 4, 4, dtype=torch.int32)),
            TypeError,
            "`x0` must be float",
        ),
        (
            lambda a: a.__setitem__(3, torch.zeros(2, 3, 4, 4, dtype=torch.complex64)),
            TypeError,
            "`v_fake`.*complex",
        ),
        (lambda a: a.__setitem__(2, torch.tensor([0, 1])), TypeError, "`t` must be float"),
        (lambda a: a.__setitem__(1, [1.0]), TypeError, "`x_t` must be a torch.Tensor"),
        (
            lambda a: a.__setitem__(4, torch.zeros(2, 3, 4, 4, device="meta")),
            ValueError,
            "same device.*v_cond on meta",
        ),
        (lambda a: a.__setitem__(3, a[3].clone().requires_grad_(True)), ValueError, "`v_fake` requires grad"),
    ],
)
def test_bad_input_errors_name_the_argument(mutate, exc, match):
    args = _base()
    mutate(args)
    with pytest.raises(exc, match=match):
        dmd_loss(*args)


def test_empty_batch_and_bad_scalars():
    x = torch.zeros(0, 3, 4, 4)
    with pytest.raises(ValueError, match="empty batch"):
        dmd_loss(x, x, torch.zeros(0), x, x)
    args = _base()
    with pytest.raises(ValueError, match="`guidance` must be a finite number"):
        dmd_loss(*args, guidance=float("nan"))
    with pytest.raises(ValueError, match="`eps` must be a finite number >= 0"):
        dmd_loss(*args, eps=-1.0)


def test_float64_goes_to_reference_automatically_and_is_refused_by_fused():
    args = [a.double() for a in _base()]
    loss = dmd_loss(*args)
    assert loss.dtype == torch.float64
    if not _available("cpp", torch.float64):
        pytest.fail("cpp should refuse float64")
    with pytest.raises(backends.BackendUnavailableError, match="float64 not supported"):
        dmd_loss(*args, backend="cpp")


# ----------------------------------------------------------------------------- GPU (skipped without a device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", [*SHAPES, (8, 16, 128, 128), (3, 5, 7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("uncond,w", [(False, 1.0), (True, 3.0)])
def test_gpu_backend_matches_reference(backend, shape, dtype, uncond, w):
    dev = torch.device("cuda")
    reasons = BACKENDS.impls[backend].not_supported_reasons("cuda", [dtype], device=dev)
    if reasons:
        pytest.skip("; ".join(reasons))
    inputs = [a.to(dev) if a is not None else None for a in make_inputs(shape, dtype, uncond)]
    x0 = inputs[0].clone().requires_grad_(True)
    loss, g = dmd_loss(x0, *inputs[1:], guidance=w, backend=backend, return_direction=True)
    loss.backward()
    ref_loss, ref_g = dmd_loss_ref(*(a.double() if a is not None else None for a in inputs), guidance=w)
    pt_loss, pt_g = dmd_loss_ref(*inputs, guidance=w, upcast=False)
    atol = 4 * torch.finfo(dtype).eps * ref_g.abs().max().item()
    assert_close_rel_to_torch(g, ref_g, pt_g, atol=atol, name=f"{backend} g")
    assert_close_rel_to_torch(loss, ref_loss, pt_loss, atol=1e-6 * ref_loss.item(), name=f"{backend} loss")
    torch.testing.assert_close(
        x0.grad.double(), (g.double() / g.numel()).to(dtype).double(), rtol=1e-2, atol=0
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_nan_inf_and_misaligned(backend):
    dev = torch.device("cuda")
    if BACKENDS.impls[backend].not_supported_reasons("cuda", [torch.float32], device=dev):
        pytest.skip(f"{backend} unavailable")
    x0, *rest = (a.to(dev) for a in _poisoned(torch.float32))
    loss, g = dmd_loss(x0, *rest, guidance=2.0, backend=backend, return_direction=True)
    _ref_loss, ref_g = dmd_loss_ref(x0, *rest, guidance=2.0)
    assert torch.isfinite(g).all() and not torch.isnan(loss)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5)
    # Offset views: pointers not 16-byte aligned → the scalar (VEC = 1) path.
    big = [torch.randn(3 * 77 + 1, device=dev) for _ in range(5)]
    mis = [b[1:].view(3, 7, 11) for b in big]
    t = torch.rand(3, device=dev)
    a = dmd_loss(mis[0], mis[1], t, mis[2], mis[3], mis[4], 2.0, backend=backend, return_direction=True)
    r = dmd_loss_ref(mis[0], mis[1], t, mis[2], mis[3], mis[4], 2.0)
    torch.testing.assert_close(a[1], r[1], rtol=1e-5, atol=1e-5)
