"""use_attention: diffusers transformers computing attention with dmdr_fast.ops.attention.

For DiT, SD3 (joint attention, qk-norm, context_pre_only, SD3.5 dual attention), Flux (double and
single blocks, RoPE) and Z-Image (complex RoPE, caption padding masks), tiny random models run
forward + backward natively and through the op's ``torch`` and ``sdpa`` backends: outputs and
parameter gradients agree to float32 rounding, and restoring gives bit-identical results.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

import dmdr_fast.models.attention as attention_module
from dmdr_fast.models import (
    DIT_LORA_TARGETS,
    DiTAdapter,
    LoraConfig,
    attention_backend,
    inject_lora,
    restore_attention,
    tiny_dit,
    use_attention,
)
from dmdr_fast.models.attention import OpJointAttnProcessor, OpProcessor, to_key_padding_mask

BACKENDS = ("torch", "sdpa")
B = 2


# ----------------------------------------------------------------------------- helpers


def _run(model: torch.nn.Module, fn: Callable[[], torch.Tensor | list[torch.Tensor]]):
    """Outputs (a list) and parameter gradients of a scalar loss on them."""
    model.zero_grad(set_to_none=True)
    out = fn()
    outs = out if isinstance(out, list) else [out]
    loss = sum((o.double() ** 2).mean() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def _processors(model: torch.nn.Module) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def _check_parity(model, fn, backends=BACKENDS, *, atol: float = 1e-5) -> dict[str, float]:
    """Native vs each backend (outputs, gradients), then restoration (bit-identical)."""
    native = _processors(model)
    ref_out, ref_grads = _run(model, fn)
    assert ref_grads, "the loss must reach the parameters"
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    diffs = {}
    for backend in backends:
        assert use_attention(model, backend) is model
        assert all(isinstance(p, OpProcessor) and p.backend == backend for p in _processors(model).values())
        out, grads = _run(model, fn)
        for o, r in zip(out, ref_out, strict=True):
            torch.testing.assert_close(o, r, rtol=0, atol=atol)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=atol * grad_scale, msg=name)
        diffs[str(backend)] = max((o - r).abs().max().item() for o, r in zip(out, ref_out, strict=True))
    assert restore_attention(model) is model
    assert all(_processors(model)[n] is p for n, p in native.items())
    out, grads = _run(model, fn)
    assert all(torch.equal(o, r) for o, r in zip(out, ref_out, strict=True))
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    return diffs


class _MaskSpy:
    """Wraps the op to record the key padding masks it receives."""

    def __init__(self, op):
        self.op, self.masks = op, []

    def __call__(self, q, k, v, *, key_padding_mask=None, scale=None, backend=None):
        self.masks.append(key_padding_mask)
        return self.op(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)


# ----------------------------------------------------------------------------- tiny models


def _sd3() -> SD3Transformer2DModel:
    """2 blocks: block 0 has SD3.5 dual attention (attn2), block 1 is context_pre_only; qk rms-norm."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _flux() -> FluxTransformer2DModel:
    """One double and one single block; RoPE axes (2, 2, 4) = head dim 8."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )


def _zimage() -> ZImageTransformer2DModel:
    """One noise refiner, one context refiner, one main layer; RoPE axes (2, 2, 4) = head dim 8."""
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=12,
        axes_dims=[2, 2, 4],
        axes_lens=[128, 16, 16],  # caption positions (up to 64 here) + image positions on axis 0
    )
    with torch.no_grad():  # zero-initialised: make padded tokens distinguishable
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, 4, 8, 8, generator=g),
        "context": torch.randn(B, 5, 12, generator=g),
        "pooled": torch.randn(B, 8, generator=g),
        "t": torch.rand(B, generator=g),
    }


# ----------------------------------------------------------------------------- per family


def test_dit_parity():
    model = DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip
    assert {type(p) for p in _processors(model).values()} == {AttnProcessor2_0}
    x = torch.randn(B, 1, 8, 8)
    t, y = torch.tensor([100.0, 900.0]), torch.tensor([1, 3])
    _check_parity(
        model, lambda: model(x, timestep=t, class_labels=y, return_dict=False)[0], (*BACKENDS, None)
    )


def test_sd3_parity_joint_dual_attention():
    model, inp = _sd3(), _inputs()
    blocks = model.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn.context_pre_only
    assert blocks[0].attn.processor is blocks[0].attn2.processor  # diffusers shares one instance

    def fn():
        return model(
            inp["x"], encoder_hidden_states=inp["context"], pooled_projections=inp["pooled"],
            timestep=inp["t"] * 1000, return_dict=False,
        )[0]  # fmt: skip

    _check_parity(model, fn)
    use_attention(model, "sdpa")  # sharing is mirrored, and restored
    assert blocks[0].attn.processor is blocks[0].attn2.processor
    assert isinstance(blocks[0].attn.processor, OpJointAttnProcessor)
    restore_attention(model)
    assert blocks[0].attn.processor is blocks[0].attn2.processor


def test_sd3_ignores_attention_mask_like_diffusers(monkeypatch):
    # JointAttnProcessor2_0 drops any attention_mask (SD3 attends to padded T5 tokens); ours too.
    model, inp = _sd3(), _inputs()
    keep = torch.ones(B, 16 + 5, dtype=torch.bool)
    keep[0, -2:] = False
    spy = _MaskSpy(attention_module._attention_op)
    monkeypatch.setattr(attention_module, "_attention_op", spy)

    def fn():
        return model(
            inp["x"], encoder_hidden_states=inp["context"], pooled_projections=inp["pooled"],
            timestep=inp["t"] * 1000, joint_attention_kwargs={"attention_mask": keep}, return_dict=False,
        )[0]  # fmt: skip

    _check_parity(model, fn, ("torch",))
    assert spy.masks and all(m is None for m in spy.masks)


def _flux_call(model, inp, **kwargs):
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=-1).float()
    x = inp["x"].flatten(2).transpose(1, 2)  # (B, 64, 4) -> use the first 16 tokens
    return model(
        x[:, :16], encoder_hidden_states=inp["context"], pooled_projections=inp["pooled"], timestep=inp["t"],
        img_ids=img_ids, txt_ids=torch.zeros(5, 3), return_dict=False, **kwargs,
    )[0]  # fmt: skip


def test_flux_parity_double_and_single_blocks():
    model, inp = _flux(), _inputs()
    assert len(model.transformer_blocks) == 1 and len(model.single_transformer_blocks) == 1
    _check_parity(model, lambda: _flux_call(model, inp))
    model.fuse_qkv_projections()  # to_qkv / to_added_qkv, same FluxAttnProcessor
    assert model.transformer_blocks[0].attn.fused_projections
    _check_parity(model, lambda: _flux_call(model, inp))


def test_flux_padding_mask_through_joint_attention_kwargs(monkeypatch):
    # Flux's pipeline passes no mask, but joint_attention_kwargs reach every processor: a (B, Lk)
    # bool keep-mask over [context, image] tokens goes through dispatch_attention_fn natively.
    model, inp = _flux(), _inputs()
    keep = torch.ones(B, 5 + 16, dtype=torch.bool)
    keep[1, 2:5] = False  # sample 1: last three context tokens are padding
    spy = _MaskSpy(attention_module._attention_op)
    monkeypatch.setattr(attention_module, "_attention_op", spy)
    _check_parity(model, lambda: _flux_call(model, inp, joint_attention_kwargs={"attention_mask": keep}))
    assert spy.masks and all(torch.equal(m, ~keep) for m in spy.masks)


def test_zimage_parity_with_padded_captions(monkeypatch):
    # Captions of 5 and 40 tokens are padded to 32 and 64 inside the model: the context refiner
    # and the main layers then get boolean keep-masks (B, L), which must reach the op.
    model, inp = _zimage(), _inputs()
    xs = list(inp["x"].unsqueeze(2))  # B × (C, F=1, H, W)
    g = torch.Generator().manual_seed(2)
    caps = [torch.randn(5, 12, generator=g), torch.randn(40, 12, generator=g)]
    spy = _MaskSpy(attention_module._attention_op)
    monkeypatch.setattr(attention_module, "_attention_op", spy)
    diffs = _check_parity(model, lambda: model(xs, inp["t"], caps, return_dict=False)[0])
    masks = [m for m in spy.masks if m is not None]
    assert masks and all(m[0].any() and not m[1].any() for m in masks)  # sample 0 has padding keys
    assert diffs["torch"] < 1e-5


def test_dit_adapter_network_with_lora(randomize_lora):
    adapter = DiTAdapter(tiny_dit(num_layers=1, seed=0)).eval()
    use_attention(adapter.network, "sdpa")  # before LoRA injection: the processors call attn.to_q etc.
    inject_lora(adapter.network, LoraConfig(targets=DIT_LORA_TARGETS, rank=2))
    randomize_lora(adapter.network)
    restore_attention(adapter.network)
    keys = set(adapter.state_dict())
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(B, 1, 8, 8, generator=g), torch.rand(B, generator=g), torch.tensor([0, 7])
    _check_parity(adapter.network, lambda: adapter(x, t, y))  # gradients include the LoRA factors
    assert set(adapter.state_dict()) == keys
    use_attention(adapter, "torch")  # the adapter module itself works too (it holds the network)
    assert all(isinstance(p, OpProcessor) for p in _processors(adapter.network).values())
    restore_attention(adapter)
    assert all(type(p) is AttnProcessor2_0 for p in _processors(adapter.network).values())


# ----------------------------------------------------------------------------- masks on Attention


@pytest.mark.parametrize("kind", ["bool", "additive_inf", "legacy_10000"])
def test_attention_module_cross_attention_masks(kind):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    g = torch.Generator().manual_seed(4)
    h, ctx = torch.randn(B, 6, 16, generator=g), torch.randn(B, 7, 12, generator=g)
    keep = torch.ones(B, 1, 7, dtype=torch.bool)
    keep[0, 0, 4:] = False
    mask = {
        "bool": keep,
        "additive_inf": torch.zeros(B, 1, 7).masked_fill(~keep, float("-inf")),
        "legacy_10000": (1.0 - keep.float()) * -10000.0,  # diffusers' UNet convention
    }[kind]
    _check_parity(attn, lambda: attn(h, encoder_hidden_states=ctx, attention_mask=mask))


def test_to_key_padding_mask_forms():
    keep = torch.tensor([[True, True, False], [True, True, True]])
    pad = ~keep
    assert to_key_padding_mask(None, 2, 3) is None
    for m in (keep, keep[:, None], keep[:, None, None]):
        assert torch.equal(to_key_padding_mask(m, 2, 3), pad)
    additive = torch.zeros(2, 3).masked_fill(pad, float("-inf"))
    assert torch.equal(to_key_padding_mask(additive[:, None, None], 2, 3), pad)
    assert torch.equal(to_key_padding_mask(keep[0], 2, 3), pad[:1].expand(2, 3))  # (Lk,) broadcast
    assert torch.equal(to_key_padding_mask(keep[:1], 2, 3), pad[:1].expand(2, 3))  # batch 1 broadcast


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(2, 1, 4, 3, dtype=torch.bool), "per-key padding mask only"),  # per query
        (torch.ones(2, 2, 1, 3, dtype=torch.bool), "per-key padding mask only"),  # per head
        (torch.ones(4, 1, 3, dtype=torch.bool), "per-key padding mask only"),  # (B·H, 1, Lk)
        (torch.ones(2, 5, dtype=torch.bool), "per-key padding mask only"),  # wrong Lk
        (torch.full((2, 3), -0.5), "attention bias"),
        (torch.ones(2, 3, dtype=torch.long), "bool"),
    ],
)
def test_to_key_padding_mask_refuses(mask, match):
    with pytest.raises(ValueError, match=match):
        to_key_padding_mask(mask, 2, 3)


# ----------------------------------------------------------------------------- API behaviour


def test_attention_backend_context_restores_previous_processors():
    model = _sd3()
    native = _processors(model)
    use_attention(model, "torch")
    torch_procs = _processors(model)
    with attention_backend(model, "sdpa") as m:
        assert m is model
        assert {p.backend for p in _processors(model).values()} == {"sdpa"}
        assert all(p.original is native[n] for n, p in _processors(model).items())  # no nesting
    assert all(_processors(model)[n] is p for n, p in torch_procs.items())
    with pytest.raises(RuntimeError, match="boom"), attention_backend(model, "sdpa"):
        raise RuntimeError("boom")
    assert all(_processors(model)[n] is p for n, p in torch_procs.items())
    use_attention(model, "native")  # "native" = diffusers' own processors
    assert all(_processors(model)[n] is p for n, p in native.items())
    restore_attention(model)  # idempotent
    assert all(_processors(model)[n] is p for n, p in native.items())


def test_unknown_backend_and_bad_inputs():
    model = _sd3()
    native = _processors(model)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash9'.*sdpa"):
        use_attention(model, "flash9")
    with pytest.raises(ValueError, match="unknown attention backend"), attention_backend(model, "nope"):
        pass
    with pytest.raises(TypeError, match="string or None"):
        use_attention(model, 3)
    with pytest.raises(ValueError, match="no diffusers attention module"):
        use_attention(torch.nn.Linear(2, 2), "torch")
    assert all(_processors(model)[n] is p for n, p in native.items())


def test_unsupported_processor_strict_and_lenient():
    model = tiny_dit(num_layers=2, seed=0)
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor())  # no replacement for it
    before = _processors(model)
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn1 \(AttnProcessor\)"):
        use_attention(model, "torch")
    assert all(_processors(model)[n] is p for n, p in before.items())  # nothing changed
    use_attention(model, "torch", strict=False)
    assert isinstance(model.transformer_blocks[0].attn1.processor, OpProcessor)
    assert type(model.transformer_blocks[1].attn1.processor) is AttnProcessor


def test_deepcopy_keeps_replacements_restorable():
    # The Trainer may deep-copy a network (student / critic from the teacher) after use_attention.
    model = use_attention(_sd3(), "torch")
    clone = copy.deepcopy(model)
    procs = _processors(clone)
    assert all(isinstance(p, OpProcessor) for p in procs.values())
    assert not any(p is q for p, q in zip(procs.values(), _processors(model).values(), strict=True))
    restore_attention(clone)
    assert all(not isinstance(p, OpProcessor) for p in _processors(clone).values())
    assert all(isinstance(p, OpProcessor) for p in _processors(model).values())
