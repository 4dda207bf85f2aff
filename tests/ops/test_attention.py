"""Tests of dmdr_fast.ops.attention (torch reference, SDPA, xformers refusal): the reference
against an independent float64 softmax, backends against the reference (forward and gradients),
padding masks (one valid key, fully padded), the custom op and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.utils import assert_close_rel_to_torch

from dmdr_fast import backends
from dmdr_fast.ops import attention
from dmdr_fast.ops.attention import BACKENDS
from dmdr_fast.ops.reference import attention_bwd_ref, attention_ref

# (B, H, Lq, Lk, D): odd lengths 1, 17, 63, Lq != Lk, D in {16, 32, 64}
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (2, 2, 63, 17, 64),
    (3, 2, 17, 63, 16),
    (2, 1, 5, 1, 32),
]
MASKS = ["none", "random", "edge"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(L):
        x = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).to(dtype)
        return x.requires_grad_(requires_grad)

    return rnd(Lq), rnd(Lk), rnd(Lk)


def make_mask(kind: str, B: int, Lk: int, seed: int = 1) -> torch.Tensor | None:
    """None, random padding, or 'edge': sample 0 keeps exactly one key, the last sample (B > 1)
    is fully padded, the others random."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Lk, generator=gen) < 0.3
    if kind == "edge":
        mask[0] = True
        mask[0, Lk // 2] = False
        if B > 1:
            mask[-1] = True
    return mask


def numpy_attention(q, k, v, mask, scale):
    """Independent float64 computation, one query row at a time."""
    q, k, v = (x.detach().double().numpy() for x in (q, k, v))
    mask = None if mask is None else mask.numpy()
    B, H, Lq, D = q.shape
    out = np.zeros((B, H, Lq, D))
    for b in range(B):
        keep = np.ones(k.shape[2], bool) if mask is None else ~mask[b]
        if not keep.any():
            continue
        for h in range(H):
            for i in range(Lq):
                s = np.array([scale * np.dot(q[b, h, i], k[b, h, j]) for j in np.flatnonzero(keep)])
                w = np.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, keep]
    return out


def _backend_reasons(backend, device="cpu", dtype=torch.float32, **inputs):
    impl = BACKENDS.impls[backend]
    inputs.setdefault("head_dim", 32)
    inputs.setdefault("has_mask", False)
    return impl.not_supported_reasons(device, [dtype], device=torch.device(device), **inputs)


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_reference_matches_independent_float64(shape, mask_kind):
    B, H, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape, dtype=torch.float64)
    mask = make_mask(mask_kind, B, Lk)
    scale = 0.7 / math.sqrt(D)
    out = attention_ref(q, k, v, mask, scale)
    assert out.dtype == torch.float64 and out.shape == (B, H, Lq, D)
    np.testing.assert_allclose(out.numpy(), numpy_attention(q, k, v, mask, scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_reference_gradients(mask_kind):
    """gradcheck of the reference in float64, and its closed-form backward against autograd."""
    q, k, v = make_qkv(3, 2, 5, 7, 4, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, 3, 7)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_ref(q, k, v, mask), (q, k, v))
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    auto = torch.autograd.grad(attention_ref(q, k, v, mask), (q, k, v), grad_out)
    closed = attention_bwd_ref(grad_out, q, k, v, mask)
    for a, c in zip(auto, closed):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- backends vs reference


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# sdpa: every dtype and mask; torch (the reference itself, cast back): fp32, plus 16-bit on edge masks.
BACKEND_CASES = (
    [("sdpa", dt, m) for dt in DTYPES for m in MASKS]
    + [("torch", torch.float32, m) for m in MASKS]
    + [("torch", dt, "edge") for dt in DTYPES[1:]]
)


@pytest.mark.parametrize("backend,dtype,mask_kind", BACKEND_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, shape, mask_kind, dtype):
    B, H, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, B, Lk)
    out = attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = _grads(out, (q, k, v), grad_out)

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = attention_ref(q64, k64, v64, mask)
    ref_grads = _grads(ref, (q64, k64, v64), grad_out.double())
    qp, kp, vp = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    pt = attention_ref(qp, kp, vp, mask, upcast=False)  # PyTorch's own error in `dtype`
    pt_grads = _grads(pt, (qp, kp, vp), grad_out)

    eps = torch.finfo(dtype).eps
    assert_close_rel_to_torch(out, ref, pt, atol=4 * eps, name=f"{backend} out")
    # A gradient entry sums D·Lk products; where they cancel exactly (a one-hot softmax row has
    # dS = P·(dP − δ) = 0) a kernel's rounding is relative to the terms, not to the result, and
    # PyTorch may happen to cancel exactly. So atol scales with √D · the largest gradient.
    mag = max(1.0, *(r.abs().max().item() for r in ref_grads))
    for name, g, r, p in zip("qkv", grads, ref_grads, pt_grads):
        assert_close_rel_to_torch(g, r, p, atol=4 * eps * math.sqrt(D) * mag, name=f"{backend} d{name}")
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_fully_padded_rows_are_zero_with_zero_grads(backend):
    q, k, v = make_qkv(2, 2, 9, 6, 16, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    out = attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_scale_and_non_contiguous_inputs(backend):
    """(B, L, H, D) projections transposed to (B, H, L, D) views, and an explicit scale."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, L, 3, 16, generator=gen).transpose(1, 2) for L in (11, 7, 7))
    assert not q.is_contiguous()
    out = attention(q, k, v, scale=0.3, backend=backend)
    torch.testing.assert_close(out, attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), None, 0.3))


def test_float64_torch_backend_and_automatic_fallback(monkeypatch):
    monkeypatch.delenv("DMDR_FAST_BACKEND", raising=False)
    q, k, v = make_qkv(1, 2, 5, 3, 8, dtype=torch.float64)
    out = attention(q, k, v)  # sdpa takes no float64: the automatic choice falls back to torch
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_ref(q, k, v))
    impl = backends.select_backend(BACKENDS, None, "cpu", [torch.float32], device=torch.device("cpu"))
    assert impl.name == "sdpa"


# ----------------------------------------------------------------------------- custom op


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("mask_kind", ["none", "edge"])
def test_opcheck(backend, mask_kind):
    q, k, v = make_qkv(2, 2, 5, 7, 8, requires_grad=True)
    mask = make_mask(mask_kind, 2, 7)
    torch.library.opcheck(torch.ops.dmdr_fast.attention.default, (q, k, v, mask, 0.35, backend))


def test_custom_op_gradients_match_autograd():
    """The custom op's registered backward (closed form) equals autograd through the backend."""
    q, k, v = make_qkv(2, 2, 5, 7, 8, requires_grad=True)
    mask = make_mask("edge", 2, 7)
    out, _ = torch.ops.dmdr_fast.attention(q, k, v, mask, 0.35, "sdpa")
    grad_out = torch.randn_like(out)
    op_grads = _grads(out, (q, k, v), grad_out)
    eager_grads = _grads(
        attention(q, k, v, key_padding_mask=mask, scale=0.35, backend="sdpa"), (q, k, v), grad_out
    )
    for a, b in zip(op_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_matches_eager(dynamic):
    """fullgraph: the op (validation and backend choice included) traces without graph breaks."""
    q, k, v = make_qkv(2, 2, 9, 5, 16)
    mask = make_mask("edge", 2, 5)

    def f(q, k, v):
        return attention(q * 2.0, k, v, key_padding_mask=mask).sum(dim=-1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    a = [x.clone().requires_grad_(True) for x in (q, k, v)]
    b = [x.clone().requires_grad_(True) for x in (q, k, v)]
    yc, ye = compiled(*a), f(*b)
    torch.testing.assert_close(yc, ye)
    yc.sum().backward()
    ye.sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"q": torch.randn(2, 3, 4)}, ValueError, r"`q` must be 4-D \(B, H, L, D\)"),
        ({"q": torch.randn(2, 3, 4, 8, dtype=torch.float16)}, TypeError, "must share one dtype"),
        ({"q": torch.randint(0, 3, (2, 3, 4, 8))}, TypeError, "`q` must be float32"),
        ({"k": torch.randn(2, 3, 5, 4)}, ValueError, r"`k` must have shape \(B, H, Lk, D\)"),
        ({"v": torch.randn(2, 3, 6, 8)}, ValueError, "`v` must have the shape of `k`"),
        ({"q": torch.randn(2, 3, 0, 8)}, ValueError, "zero-size"),
        ({"key_padding_mask": torch.zeros(2, 5)}, TypeError, "must be a bool tensor"),
        ({"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError, r"\(B, Lk\) = \(2, 5\)"),
        ({"scale": float("nan")}, ValueError, "`scale` must be a finite number"),
        ({"scale": True}, ValueError, "`scale` must be a finite number"),
        ({"backend": "nope"}, ValueError, "unknown backend 'nope'"),
    ],
)
def test_validation_errors(kwargs, error, match):
    args = {"q": torch.randn(2, 3, 4, 8), "k": torch.randn(2, 3, 5, 8), "v": torch.randn(2, 3, 5, 8)}
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        attention(q, k, v, **args)


def test_xformers_is_registered_and_refusals_explain_why():
    assert "xformers" in BACKENDS.impls
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    with pytest.raises(backends.BackendUnavailableError) as info:
        attention(q, k, v, backend="xformers")
    msg = str(info.value)
    assert "xformers: runs on ['cuda'], not 'cpu'" in msg and "sdpa: available" in msg
    reasons = _backend_reasons("xformers", device="cuda")
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        assert reasons and "xformers" in reasons[0]
    mask_check = BACKENDS.impls["xformers"].input_checks
    assert any("key_padding_mask is not supported" in r for c in mask_check for r in c(has_mask=True))


def test_sdpa_refuses_float64_explicitly():
    q, k, v = make_qkv(1, 1, 4, 4, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailableError, match="dtype float64 not supported"):
        attention(q, k, v, backend="sdpa")
