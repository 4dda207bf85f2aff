"""The Triton flash-attention kernels (fwd + bwd) and the FP8 forward.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): float32 only, lengths and
head dims <= 64, and few cases (the interpreter is slow; docs/architecture.md §6). bf16/fp16, large shapes, the
autotuned GPU configurations and the fp8 kernel run only with a CUDA device (``gpu`` mark).
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.ops.test_attention import make_mask, make_qkv
from tests.utils import assert_close_rel_to_torch, sqnr_db

from dmdr_fast import backends, ops
from dmdr_fast.ops import attention, attention_fp8
from dmdr_fast.ops._attention_common import AttentionInputs
from dmdr_fast.ops.attention import BACKENDS
from dmdr_fast.ops.attention_fp8 import FP8_DTYPE, attention_fp8_torch, quantize_fp8_per_head
from dmdr_fast.ops.reference import attention_ref

CPU = torch.device("cpu")


def _skip_unless_triton(device: str = "cpu", dtype=torch.float32, op: str = "attention") -> None:
    impl = ops.OPS[op].impls["triton"]
    reasons = impl.not_supported_reasons(
        device, [dtype], device=torch.device(device), head_dim=64, has_mask=True, batch_heads=1, row_span=0
    )
    if reasons:
        pytest.skip(f"triton unavailable: {'; '.join(reasons)}")


def check_against_reference(shape, mask_kind, dtype, device="cpu", layout="bhld", factor=2.0):
    """Forward, LSE-free output and gradients of the Triton backend vs the float64 reference, with
    flash-attention's rule: at most ``factor``× PyTorch's own error in ``dtype`` + an atol."""
    B, H, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape, dtype=dtype)
    if layout == "blhd":  # (B, L, H, D) projections viewed as (B, H, L, D): non-contiguous
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.to(device).requires_grad_(True) for x in (q, k, v))
    mask = make_mask(mask_kind, B, Lk)
    mask = None if mask is None else mask.to(device)
    out = attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert out.dtype == dtype and out.shape == (B, H, Lq, D) and out.stride() == q.stride()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = attention_ref(q64, k64, v64, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    qp, kp, vp = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    pt = attention_ref(qp, kp, vp, mask, upcast=False)
    pt_grads = torch.autograd.grad(pt, (qp, kp, vp), grad_out)

    # Blockwise accumulation rounds differently from PyTorch's; where the terms of a sum cancel
    # (one-hot softmax rows) the error scales with the terms: atol ∝ eps·√D·(largest gradient).
    eps = torch.finfo(dtype).eps
    assert_close_rel_to_torch(out, ref, pt, factor=factor, atol=4 * eps, name="triton out")
    mag = max(1.0, *(r.abs().max().item() for r in ref_grads))
    for name, g, r, p in zip("qkv", grads, ref_grads, pt_grads):
        assert torch.isfinite(g).all()
        assert_close_rel_to_torch(g, r, p, factor=factor, atol=4 * eps * math.sqrt(D) * mag, name=f"d{name}")


# ----------------------------------------------------------------------------- interpreter (fp32)

# (B, H, Lq, Lk, D), mask, layout: ragged tails in Lq, Lk and D (24 → BLOCK_D 32), lengths 1 and
# 64, Lq != Lk, a one-valid-key row and a fully padded sample, an all-even case (no load masks)
# and a (B, L, H, D) layout.
INTERPRETER_CASES = [
    ((2, 2, 17, 33, 16), "edge", "bhld"),
    ((1, 2, 64, 63, 64), "none", "bhld"),
    ((2, 1, 1, 1, 16), "edge", "bhld"),
    ((2, 2, 40, 64, 24), "random", "blhd"),
    ((1, 1, 32, 16, 32), "none", "bhld"),
]


@pytest.mark.triton
@pytest.mark.parametrize("shape,mask_kind,layout", INTERPRETER_CASES)
def test_triton_matches_reference_fp32(shape, mask_kind, layout):
    _skip_unless_triton()
    check_against_reference(shape, mask_kind, torch.float32, layout=layout)


@pytest.mark.triton
def test_triton_lse_and_fully_padded_rows():
    _skip_unless_triton()
    from dmdr_fast.ops.attention import attention_fwd_triton

    q, k, v = make_qkv(2, 2, 19, 21, 16)
    mask = make_mask("edge", 2, 21)
    out, lse = attention_fwd_triton(AttentionInputs(q, k, v, mask, 0.3))
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(mask[:, None, None, :], -math.inf)
    ref_lse = torch.logsumexp(s.double(), dim=-1)
    torch.testing.assert_close(lse[0], ref_lse[0].float(), rtol=1e-6, atol=1e-6)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()  # stored +inf: P recomputes to 0
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.triton
def test_triton_opcheck_and_compile():
    """The custom op (fake, autograd registration) and torch.compile routing through it."""
    _skip_unless_triton()
    q, k, v = make_qkv(2, 2, 5, 7, 16, requires_grad=True)
    mask = make_mask("edge", 2, 7)
    torch.library.opcheck(
        torch.ops.dmdr_fast.attention.default,
        (q, k, v, mask, 0.25, "triton"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )

    def f(q, k, v):
        return attention(q, k, v, key_padding_mask=mask, backend="triton") * 2.0

    a = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(*a)
    yr = attention_ref(q, k, v, mask) * 2.0
    torch.testing.assert_close(yc, yr, rtol=1e-5, atol=1e-6)
    yc.sum().backward()
    for x, g in zip(a, torch.autograd.grad(yr.sum(), (q, k, v))):
        torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-5)


def test_triton_refusals():
    impl = BACKENDS.impls["triton"]
    reasons = impl.not_supported_reasons(
        "cpu", [torch.float32], device=CPU, head_dim=320, has_mask=False, batch_heads=70000, row_span=0
    )
    if reasons and ("TRITON_INTERPRET" in reasons[0] or "not installed" in reasons[0]):
        pytest.skip(f"triton unavailable: {reasons[0]}")
    assert any("head dim 320 > 256" in r for r in reasons)
    assert any("B·H = 70000 > 65535" in r for r in reasons)
    q, k, v = make_qkv(1, 1, 4, 4, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailableError, match="dtype float64 not supported"):
        attention(q, k, v, backend="triton")


def test_automatic_choice_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.delenv("DMDR_FAST_BACKEND", raising=False)
    impl = backends.select_backend(BACKENDS, None, "cpu", [torch.float32], device=CPU, head_dim=16)
    assert impl.name == "sdpa"


# ----------------------------------------------------------------------------- FP8 on CPU


def test_quantize_fp8_per_head(record_property):
    x = (
        torch.randn(2, 3, 17, 32, generator=torch.Generator().manual_seed(0))
        * torch.tensor([0.01, 1.0, 300.0])[:, None, None]
    )
    x[1, 2] = 0.0  # an all-zero head
    x8, descale = quantize_fp8_per_head(x)
    assert x8.dtype == FP8_DTYPE and x8.shape == x.shape
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    assert descale[1, 2] == 1.0 and torch.equal(x8[1, 2].float(), torch.zeros(17, 32))
    # each head's largest magnitude maps to e4m3's largest finite value (448): full range used
    assert torch.equal(x8[0].float().abs().amax(dim=(-2, -1)), torch.full((3,), 448.0))
    deq = x8.float() * descale[..., None, None]
    assert torch.isfinite(deq).all()
    db = min(sqnr_db(x[b, h], deq[b, h]) for b in range(2) for h in range(3) if (b, h) != (1, 2))
    record_property("fp8_cast_sqnr_db", db)
    print(f"fp8 e4m3 per-head cast SQNR: {db:.1f} dB")
    assert db >= 25.0  # torchao's bar for fp8 casts (test/float8/test_base.py)


@pytest.mark.parametrize("shape,mask_kind", [((2, 3, 63, 40, 64), "random"), ((2, 2, 17, 17, 16), "edge")])
def test_fp8_emulation_sqnr(shape, mask_kind, record_property):
    B, Lk = shape[0], shape[3]
    q, k, v = make_qkv(*shape)
    mask = make_mask(mask_kind, B, Lk)
    out = attention_fp8(q, k, v, key_padding_mask=mask)  # CPU: the torch emulation
    ref = attention_ref(q, k, v, mask)
    db = sqnr_db(ref, out)
    record_property("fp8_attention_sqnr_db", db)
    print(f"fp8 attention (emulated) SQNR vs fp32, {shape} {mask_kind}: {db:.1f} dB")
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert db >= 20.0  # e4m3 has 3 mantissa bits (≈31 dB per cast); three casts + P's: > 20 dB
    if mask_kind == "edge":
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_fp8_refuses_grad_and_triton_on_cpu():
    q, k, v = make_qkv(1, 2, 8, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="`q` requires grad, but the FP8 path is forward-only"):
        attention_fp8(q, k, v)
    q, k, v = (x.detach() for x in (q, k, v))
    with pytest.raises(
        backends.BackendUnavailableError, match=r"interpreter cannot run fp8|TRITON_INTERPRET"
    ):
        attention_fp8(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="attention_fp8: `k` must have shape"):
        attention_fp8(q, k[..., :8], v)


def test_fp8_opcheck():
    q, k, v = make_qkv(2, 2, 5, 7, 16)
    mask = make_mask("random", 2, 7)
    torch.library.opcheck(torch.ops.dmdr_fast.attention_fp8.default, (q, k, v, mask, 0.25, "torch"))


# ----------------------------------------------------------------------------- GPU only

GPU_SHAPES = [
    (2, 4, 1024, 1024, 64),
    (1, 3, 4096 + 333, 4096 + 333, 64),  # SD3-like joint attention: image + text tokens
    (2, 2, 1000, 77, 128),  # cross attention, ragged
    (1, 2, 513, 700, 256),
    (2, 2, 129, 255, 80),  # non-power-of-two head dim
]


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "edge"])
def test_triton_gpu_matches_reference(shape, dtype, mask_kind):
    _skip_unless_triton("cuda", dtype)
    if dtype == torch.float32 and shape[2] * shape[3] > 2**22:
        pytest.skip("fp32 reference of this size is slow; covered in 16-bit")
    check_against_reference(shape, mask_kind, dtype, device="cuda", layout="blhd")


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 4, 1024, 1024, 64), (1, 3, 4429, 4429, 64), (2, 2, 1000, 77, 128)])
def test_fp8_kernel_gpu(shape, record_property):
    _skip_unless_triton("cuda", torch.bfloat16, op="attention_fp8")
    B, Lk, D = shape[0], shape[3], shape[4]
    q, k, v = (x.cuda() for x in make_qkv(*shape, dtype=torch.bfloat16))
    mask = make_mask("edge", B, Lk).cuda()
    out = attention_fp8(q, k, v, key_padding_mask=mask, backend="triton")
    ref = attention_ref(q, k, v, mask)
    emu = attention_fp8_torch(AttentionInputs(q, k, v, mask, 1 / math.sqrt(D)))
    db, db_emu = sqnr_db(ref, out), sqnr_db(emu, out)
    record_property("fp8_kernel_sqnr_db", db)
    print(f"fp8 kernel SQNR vs fp32 {shape}: {db:.1f} dB (vs torch emulation {db_emu:.1f} dB)")
    assert db >= 20.0 and db_emu >= 25.0
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
