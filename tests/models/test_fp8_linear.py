"""FP8 frozen linears (dmdr_fast.models.fp8): the layer against its float64 reference, per-layer
SQNR on the tiny DiT / SD3 / Flux transformers, input-only gradients, LoRA with per-sample scales
on an FP8 base, and the conversion rules.

Tolerances. An e4m3 value has 3 mantissa bits: round-to-nearest leaves a relative error uniform
in ±2^-4 .. ±2^-5 (by the position in the binade), whose variance gives ~31.9 dB SQNR for one
quantised tensor; a GEMM of two independently quantised operands adds the two noises, ~28.9 dB
(docs/fp8.md). The thresholds below (25 dB) leave ~4 dB for outlier rows, whose large amax coarsens
the grid of the rest of the row. Against the float64 reference of the same quantisation, the only
error is the GEMM's own accumulation and output rounding, held to 2 ulps of the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from tests.utils import sqnr_db as sqnr
from torch import nn

from dmdr_fast.models import DiTAdapter, LoraConfig, inject_lora, lora_parameters, lora_scale, tiny_dit
from dmdr_fast.models.fp8 import (
    DEFAULT_FP8_EXCLUDE,
    Fp8Linear,
    dequantize_linears,
    fp8_linear,
    fp8_plan,
    quantize_linears,
)
from dmdr_fast.models.lora import merge_and_unload, merged_state_dict
from dmdr_fast.ops.reference import fp8_linear_ref, quantize_fp8_ref

SQNR_DB = 25.0
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("lead", "k", "n", "bias"), [((5, 3), 48, 32, True), ((1,), 16, 16, False), ((7,), 64, 80, True)]
)
def test_forward_matches_float64_reference(dtype, lead, k, n, bias):
    layer = Fp8Linear.from_linear(_linear(k, n, bias))
    x = (torch.randn(*lead, k) * 3).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = fp8_linear_ref(x, layer.weight_fp8, layer.weight_scale, layer.bias)
    # fp32: accumulation over K plus one rounding, bounded by K·ulp·Σ|x_k w_k|; half types: the
    # output's own rounding (2 ulps of the dtype).
    mag = fp8_linear_ref(
        x.abs(), layer.weight_fp8.float().abs().to(torch.float8_e4m3fn), layer.weight_scale
    ).abs()
    tol = (k * ULP[dtype] if dtype == torch.float32 else 2 * ULP[dtype]) * (mag + 1e-30) + 1e-30
    if layer.bias is not None:
        tol = tol + 2 * ULP[dtype] * layer.bias.double().abs()
    assert ((y.double() - ref).abs() <= tol).all()


def test_weight_is_quantised_per_output_channel():
    lin = _linear(32, 48)
    with torch.no_grad():
        lin.weight[3] *= 1000  # one loud channel must not coarsen the others
    layer = Fp8Linear.from_linear(lin)
    q, s = quantize_fp8_ref(lin.weight)
    assert torch.equal(layer.weight_fp8.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.weight_scale, s) and layer.weight_scale.shape == (48, 1)
    assert sqnr(lin.weight, layer.weight) > 30  # each row on its own grid
    assert not list(layer.parameters())  # frozen by construction: buffers only


def test_output_dtype_follows_autocast():
    layer = Fp8Linear.from_linear(_linear(32, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 32)).dtype == torch.bfloat16
    assert layer(torch.randn(4, 32)).dtype == torch.float32


def test_refuses_wrong_width():
    layer = Fp8Linear.from_linear(_linear(32, 16))
    with pytest.raises(ValueError, match="expects 32"):
        layer(torch.randn(4, 33))


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_backward_gives_the_input_gradient_only(mode):
    lin = _linear(64, 48)
    layer = Fp8Linear.from_linear(lin, backward=mode)
    x = torch.randn(9, 5, 64, requires_grad=True)
    g = torch.randn(9, 5, 48)
    (gx,) = torch.autograd.grad(layer(x), x, g)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    exact = g.double() @ layer.weight.double()  # the gradient through the dequantised weight
    # bf16: dy rounded to bf16 then one bf16-output GEMM (~50 dB); fp8: dy quantised to e4m3.
    assert sqnr(exact, gx) > (40.0 if mode == "bf16" else SQNR_DB)
    assert sqnr(g.double() @ lin.weight.double(), gx) > SQNR_DB  # against the original weight too


def test_functional_form_equals_module():
    layer = Fp8Linear.from_linear(_linear(32, 32))
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), fp8_linear(x, layer.weight_fp8, layer.weight_scale, layer.bias))


def _capture_inputs(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n in names
    ]
    return seen, hooks


def _per_layer_sqnr(model: nn.Module, run) -> dict[str, float]:
    """Quantise a copy's layers; feed each FP8 layer the activations the fp32 model saw."""
    import copy

    model = model.eval().requires_grad_(False)
    fp8 = copy.deepcopy(model)
    report = quantize_linears(fp8)
    assert report.quantized, "nothing was quantised"
    seen, hooks = _capture_inputs(model, report.quantized)
    with torch.no_grad():
        run(model)
    for h in hooks:
        h.remove()
    out = {}
    for name in report.quantized:
        x = seen[name]
        ref = model.get_submodule(name)(x)
        out[name] = sqnr(ref, fp8.get_submodule(name)(x))
    return out


def test_per_layer_sqnr_tiny_dit():
    model = tiny_dit(num_layers=2, seed=0)
    adapter = DiTAdapter(model)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g), torch.arange(6)
    values = _per_layer_sqnr(model, lambda _m: adapter.velocity(x, t, y))
    assert len(values) == 14 and min(values.values()) > SQNR_DB, values  # 2 blocks × (6 + AdaLN)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_per_layer_sqnr_tiny_text_to_image(family, tmp_path):
    from dmdr_fast.models.families import get_family

    fam = get_family(family)
    pipe = fam.random_pipeline("tiny", tmp_path / family)
    net = pipe.transformer
    g = torch.Generator().manual_seed(0)
    if family == "sd3":
        cfg = net.config
        kwargs = {
            "hidden_states": torch.randn(2, cfg.in_channels, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([500.0, 20.0]),
        }
    else:
        cfg = net.config
        L = 64
        kwargs = {
            "hidden_states": torch.randn(2, L, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5, 0.02]),
            "img_ids": torch.zeros(L, 3),
            "txt_ids": torch.zeros(7, 3),
            "guidance": torch.tensor([3.5, 3.5]) if cfg.guidance_embeds else None,
        }
    values = _per_layer_sqnr(net, lambda m: m(**kwargs, return_dict=False))
    w8a8 = sorted(v for n, v in values.items() if "norm" not in n)
    print(
        f"{family}: {len(values)} layers, W8A8 SQNR min {w8a8[0]:.1f} dB, median {w8a8[len(w8a8) // 2]:.1f} dB"
    )
    assert values and min(values.values()) > SQNR_DB, values
    assert not any(
        n.startswith(("time_text_embed", "context_embedder", "norm_out", "proj_out")) for n in values
    )


def test_conversion_rules():
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(_linear(32, 64), _linear(64, 32)))
    model.add_module("odd", _linear(32, 24))  # 24 not divisible by 16 (CUDA alignment)
    model.add_module("time_embedding", _linear(32, 32))
    model.add_module("trained", nn.Linear(32, 32))  # requires grad
    model.add_module("norm1", nn.Sequential(_linear(32, 192)))  # AdaLN modulation
    report = quantize_linears(model)
    assert report.quantized == ["blocks.0", "blocks.1", "norm1.0"] and report.weight_only == ["norm1.0"]
    assert model.blocks[0].activations and not model.norm1[0].activations
    assert report.skipped["odd"].startswith("24x32 not divisible")
    assert report.skipped["time_embedding"] == "excluded by '*embed*'"
    assert report.skipped["trained"] == "trainable"
    assert type(model.trained) is nn.Linear and model.trained.weight.requires_grad
    assert report.bytes_before == (2 * 32 * 64 + 32 * 192) * 4
    assert report.bytes_after == 2 * 32 * 64 + 32 * 192 + (64 + 32 + 192) * 4
    assert "3 linears quantised (1 weight-only" in report.summary()
    plan = fp8_plan(nn.Sequential(_linear(32, 64)).to("meta"))  # the same count, nothing allocated
    assert plan.quantized == ["0"] and plan.bytes_after == 32 * 64 + 64 * 4
    # An empty list quantises every eligible layer, the default list included.
    assert "*embed*" in DEFAULT_FP8_EXCLUDE
    emb = nn.ModuleDict({"pos_embed": _linear(32, 32)})
    assert quantize_linears(emb, exclude=()).quantized == ["pos_embed"]


def test_shared_weights_share_one_fp8_copy():
    base = _linear(32, 32)
    a, b = nn.Sequential(base), nn.Sequential(nn.Linear(32, 32))
    b[0].weight, b[0].bias = base.weight, base.bias  # b's module is a copy sharing a's tensors
    shared: dict = {}
    quantize_linears(a, shared=shared)
    quantize_linears(b, shared=shared)
    assert a[0] is b[0] and isinstance(a[0], Fp8Linear)


def test_lora_on_fp8_base_keeps_per_sample_scales():
    teacher = DiTAdapter(tiny_dit(seed=0)).eval()
    inject_lora(
        teacher.network,
        LoraConfig(targets=["*attn1.to_q", "*attn1.to_v", "*ff.net.2"], rank=4),
        freeze_base=True,
    )
    teacher.network.requires_grad_(False)
    for p in lora_parameters(teacher.network):
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(teacher.network):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    report = quantize_linears(teacher.network)
    assert "transformer_blocks.0.attn1.to_q" in report.quantized  # the wrapper's name
    assert isinstance(teacher.network.transformer_blocks[0].attn1.to_q.base_layer, Fp8Linear)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 9])
    xs, ts, ys = x.repeat(2, 1, 1, 1), t.repeat(2), y.repeat(2)
    scales = torch.tensor([0.0] * 3 + [1.5] * 3)
    with lora_scale(teacher.network, scales):
        both = teacher.velocity(xs, ts, ys)
    with lora_scale(teacher.network, 0.0):
        v0 = teacher.velocity(x, t, y)
    with lora_scale(teacher.network, 1.5):
        v1 = teacher.velocity(x, t, y)
    # Row-wise quantisation: each sample's tokens are quantised on their own, so batching changes
    # only float32 rounding (GEMM blocking) — which can flip an activation to its neighbouring e4m3
    # value downstream: a few elements move by ~one e4m3 step, the rest agree to 1e-5.
    ref = torch.cat([v0, v1])
    diff = (both - ref).abs()
    assert (diff > 1e-5).float().mean() < 0.1 and diff.max() < 2**-4 * ref.abs().max()
    with lora_scale(teacher.network, 1.5):
        teacher.velocity(x, t, y).square().mean().backward()
    grads = [p.grad for p in lora_parameters(teacher.network)]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads[:2])  # the first block's factors: through FP8 layers


def test_merging_refuses_fp8_bases_and_dequantize_restores_linears():
    model = nn.Sequential(_linear(32, 32))
    inject_lora(model, LoraConfig(targets=["0"], rank=2), freeze_base=True)
    quantize_linears(model)
    for fn in (merged_state_dict, merge_and_unload):
        with pytest.raises(TypeError, match="dequantize_linears"):
            fn(model)
    fp8_weight = model[0].base_layer.weight
    dequantize_linears(model)
    assert type(model[0].base_layer) is nn.Linear and not model[0].base_layer.weight.requires_grad
    assert torch.equal(model[0].base_layer.weight, fp8_weight)
    merged = merged_state_dict(model)  # merging works again
    assert all(t.dtype == torch.float32 for t in merged.values())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_cuda_matches_reference_and_keeps_sqnr(mode):
    """On the GPU: CUDA's row-wise FP8 GEMM (bf16 output) against the float64 reference, the
    SQNR against the fp32 linear, and the input gradient, at an SD3-like width."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lin = _linear(1536, 1536 * 4).cuda()
    layer = Fp8Linear.from_linear(lin, backward=mode)
    x = torch.randn(3, 333, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = fp8_linear_ref(x.detach(), layer.weight_fp8, layer.weight_scale, layer.bias)
    # bf16 output: 2 ulps of bf16 over the reference's magnitude (fp32 accumulation inside).
    assert sqnr(ref, y) > 45.0
    assert sqnr(lin(x.detach().float()), y) > SQNR_DB
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    exact = torch.ones(3, 333, 6144, device="cuda", dtype=torch.float64) @ layer.weight.double()
    assert sqnr(exact, gx) > (40.0 if mode == "bf16" else SQNR_DB)
