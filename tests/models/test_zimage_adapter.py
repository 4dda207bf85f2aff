"""ZImageAdapter on a tiny random Z-Image pipeline assembled offline (tiny Qwen3, byte-level tokenizer)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from dmdr_fast.conditions import cat_conds, slice_cond
from dmdr_fast.models import (
    FlowModelAdapter,
    LoraConfig,
    inject_lora,
    lora_scale,
    make_student,
    restore_attention,
    use_attention,
)
from dmdr_fast.models.attention import OpZImageAttnProcessor
from dmdr_fast.models.zimage import (
    ZIMAGE_FEEDFORWARD_TARGETS,
    ZIMAGE_LORA_TARGETS,
    ZImageAdapter,
    ZImageCondition,
)
from dmdr_fast.pipelines.random import build_random_pipeline

TOKENS = 48  # max_sequence_length: the conditions' padded length
HIDDEN = 16  # Qwen3 hidden size = the transformer's cap_feat_dim
SHIFT = 3.0
# A tuple: ZImagePipeline.encode_prompt overwrites the items of a prompt list with the chat
# template, so every call below gets a fresh list(PROMPTS).
PROMPTS = ("a cat", "the dog on a red mat")  # different token counts


def _pipeline() -> ZImagePipeline:
    """The tiny Z-Image pipeline of ``dmdr-fast make-pipeline --family zimage`` (Qwen3 16 wide,
    1 + 1 refiner layers of width 32, random pad tokens, VAE factor 2), progress bars off."""
    pipe = build_random_pipeline("zimage", "tiny", Path(tempfile.gettempdir()))
    assert pipe.text_encoder.config.hidden_size == HIDDEN
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> ZImagePipeline:
    return _pipeline()


@pytest.fixture
def adapter(pipe: ZImagePipeline) -> ZImageAdapter:
    return ZImageAdapter.from_pipeline(pipe, resolution=16, max_sequence_length=TOKENS)


def _latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _with_scheduler(pipe: ZImagePipeline, scheduler: FlowMatchEulerDiscreteScheduler) -> ZImagePipeline:
    new = ZImagePipeline(**{**pipe.components, "scheduler": scheduler})
    new.set_progress_bar_config(disable=True)
    return new


def _sample(pipe: ZImagePipeline, x: torch.Tensor, steps: int, guidance: float = 0.0) -> torch.Tensor:
    return pipe(
        list(PROMPTS),
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=x.clone(),
        max_sequence_length=TOKENS,
        output_type="latent",
    ).images


def test_construction_and_shapes(adapter: ZImageAdapter, pipe: ZImagePipeline):
    assert isinstance(adapter, FlowModelAdapter)
    assert adapter.network is pipe.transformer
    assert adapter.family == "zimage" and adapter.condition_class is ZImageCondition
    assert adapter.default_lora_targets == ZIMAGE_LORA_TARGETS
    assert adapter.sample_shape == (4, 8, 8)  # 16 px / VAE factor 2
    assert adapter.shift == SHIFT and adapter.num_train_timesteps == 1000
    assert ZImageAdapter.from_pipeline(pipe, resolution=(32, 16)).sample_shape == (4, 16, 8)
    assert ZImageAdapter.from_pipeline(pipe).resolution == (1024, 1024)
    with pytest.raises(ValueError, match="divisible by 4"):
        ZImageAdapter.from_pipeline(pipe, resolution=18)
    with pytest.raises(TypeError, match="ZImageTransformer2DModel"):
        ZImageAdapter(torch.nn.Linear(2, 2))
    cond = adapter.encode_condition(list(PROMPTS))
    assert isinstance(cond, ZImageCondition) and len(cond) == 2
    assert cond.prompt_embeds.shape == (2, TOKENS, HIDDEN)
    assert cond.lengths.dtype == torch.int64 and cond.lengths.shape == (2,)
    assert cond.lengths[0] < cond.lengths[1] < TOKENS
    v = adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), cond)
    assert v.shape == (2, 4, 8, 8) and v.dtype == torch.float32 and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="ZImageCondition"):
        adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        adapter.velocity(_latents(3), torch.tensor([0.3, 0.9, 0.1]), cond)
    with pytest.raises(ValueError, match="lengths"):
        adapter.velocity(_latents(), 0.5, ZImageCondition(cond.prompt_embeds, torch.tensor([0, 3])))
    with pytest.raises(ValueError, match="channels"):
        adapter.velocity(torch.zeros(2, 4, 7, 8), 0.5, cond)


def test_encode_condition_matches_pipeline(adapter: ZImageAdapter, pipe: ZImagePipeline):
    cond = adapter.encode_condition(list(PROMPTS))
    embeds, negative = pipe.encode_prompt(
        list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=TOKENS
    )
    assert negative == []
    assert cond.lengths.tolist() == [len(e) for e in embeds]
    for ours, ref in zip(cond.unpad(), embeds, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for i, n in enumerate(cond.lengths.tolist()):
        assert not cond.prompt_embeds[i, n:].any()  # zero padding
    assert not cond.prompt_embeds.requires_grad
    assert adapter.encode_condition("a cat").prompt_embeds.shape == (1, TOKENS, HIDDEN)
    # Truncation: the tokenizer cuts at max_sequence_length, so every length is then L.
    short = ZImageAdapter.from_pipeline(pipe, resolution=16, max_sequence_length=12)
    truncated = short.encode_condition(list(PROMPTS))
    assert truncated.prompt_embeds.shape == (2, 12, HIDDEN) and truncated.lengths.tolist() == [12, 12]
    with pytest.raises(ValueError, match="prompts"):
        adapter.encode_condition([])
    with pytest.raises(ValueError, match="prompts"):
        adapter.encode_condition([1, 2])


def test_velocity_matches_direct_transformer_call(adapter: ZImageAdapter, pipe: ZImagePipeline):
    # The pipeline's call: latents as a list of (C, 1, H, W), time (1000 − σ·1000) / 1000, output negated.
    cond = adapter.encode_condition(list(PROMPTS))
    embeds, _ = pipe.encode_prompt(
        list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=TOKENS
    )
    x, t = _latents(), torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = adapter.velocity(x, t, cond)
        out = pipe.transformer(
            list(x.unsqueeze(2).unbind(0)), (1000 - t * 1000) / 1000, embeds, return_dict=False
        )[0]
        ref = -torch.stack([o.float() for o in out], dim=0).squeeze(2)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        torch.testing.assert_close(
            adapter.velocity(x, 0.5, cond), adapter.velocity(x, torch.full((2,), 0.5), cond)
        )


def test_one_step_matches_exported_pipeline(adapter: ZImageAdapter, pipe: ZImagePipeline):
    # The key parity: one step of the exported pipeline is x̂0 = ε − 1·v(ε, 1).
    kwargs = adapter.pipeline_call_kwargs(1)
    assert kwargs == {"num_inference_steps": 1, "guidance_scale": 0.0, "max_sequence_length": TOKENS}
    exported = _with_scheduler(pipe, adapter.export_scheduler(1, SHIFT))
    noise = _latents(seed=3)
    with torch.no_grad():
        ref = exported(
            list(PROMPTS), height=16, width=16, latents=noise.clone(), output_type="latent", **kwargs
        ).images
        ours = noise - 1.0 * adapter.velocity(noise, 1.0, adapter.encode_condition(list(PROMPTS)))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_few_step_grid_matches_pipeline(adapter: ZImageAdapter, pipe: ZImagePipeline):
    for steps in (1, 2, 4, 8):
        scheduler = adapter.export_scheduler(steps, SHIFT)
        assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == SHIFT
        assert scheduler.config.stochastic_sampling == (steps > 1)
        exported = _with_scheduler(pipe, scheduler)
        with torch.no_grad():
            _sample(exported, _latents(), steps)  # set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)
        grid = adapter.few_step_grid(steps, SHIFT)
        torch.testing.assert_close(grid, exported.scheduler.sigmas.float(), rtol=0, atol=0)
        s = torch.linspace(1.0, 1.0 / steps, steps)
        torch.testing.assert_close(grid[:-1], SHIFT * s / (1 + (SHIFT - 1) * s))


def test_euler_loop_matches_pipeline(adapter: ZImageAdapter, pipe: ZImagePipeline):
    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        adapter.export_scheduler(steps, SHIFT).config, stochastic_sampling=False
    )
    x = _latents(seed=4)
    with torch.no_grad():
        ref = _sample(_with_scheduler(pipe, scheduler), x, steps)
        cond = adapter.encode_condition(list(PROMPTS))
        grid = adapter.few_step_grid(steps, SHIFT)
        for i in range(steps):
            x = x + (grid[i + 1] - grid[i]) * adapter.velocity(x, grid[i].expand(2), cond)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_cfg_matches_adapter_loop(adapter: ZImageAdapter, pipe: ZImagePipeline):
    # ZImagePipeline's CFG: pos + g·(pos − neg) with negative prompt "" (our null condition).
    guidance, steps = 2.0, 2
    x = _latents(seed=5)
    with torch.no_grad():
        ref = _sample(pipe, x, steps, guidance=guidance)
        both = cat_conds([adapter.encode_condition(list(PROMPTS)), adapter.null_condition(2)])
        grid = adapter.few_step_grid(steps, SHIFT)  # the fixture's scheduler is deterministic, same grid
        for i in range(steps):
            v_cond, v_uncond = adapter.velocity(torch.cat([x, x]), grid[i].expand(4), both).chunk(2)
            x = x + (grid[i + 1] - grid[i]) * (v_cond + guidance * (v_cond - v_uncond))
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_null_condition_cached(adapter: ZImageAdapter, monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = adapter.pipeline.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs.get("prompt", args[0] if args else [])))
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.pipeline, "encode_prompt", counting)
    null3 = adapter.null_condition(3)
    null1 = adapter.null_condition(1)
    assert calls == [[""]]
    assert null3.prompt_embeds.shape == (3, TOKENS, HIDDEN) and null3.lengths.shape == (3,)
    empty = adapter.encode_condition([""])
    for i in range(3):
        torch.testing.assert_close(null3.prompt_embeds[i : i + 1], empty.prompt_embeds, rtol=0, atol=0)
    assert null3.lengths.tolist() == empty.lengths.tolist() * 3
    torch.testing.assert_close(null1.prompt_embeds, empty.prompt_embeds, rtol=0, atol=0)
    assert not any("null" in k for k in adapter.state_dict())


def test_cat_and_slice_conditions(adapter: ZImageAdapter):
    a, b = adapter.encode_condition(list(PROMPTS)), adapter.null_condition(1)
    c = cat_conds([a, b, a])
    assert c.prompt_embeds.shape == (5, TOKENS, HIDDEN) and c.lengths.shape == (5,)
    assert c.lengths.tolist() == [*a.lengths.tolist(), *b.lengths.tolist(), *a.lengths.tolist()]
    torch.testing.assert_close(slice_cond(c, 2, 3).prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(slice_cond(c, 3, 5).lengths, a.lengths)
    # One batch of mixed lengths gives what the parts give alone (padding masked per sample).
    x, t = _latents(5, seed=6), torch.rand(5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = adapter.velocity(x, t, c)
        parts = [adapter.velocity(x[i : i + 1], t[i : i + 1], slice_cond(c, i, i + 1)) for i in range(5)]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        cat_conds([a, ZImageCondition(a.prompt_embeds[:, :40], a.lengths)])
    with pytest.raises(ValueError):
        cat_conds([])


def test_decode_range_and_gradient(adapter: ZImageAdapter, pipe: ZImagePipeline):
    x = _latents().requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(x / 0.3611 + 0.1159, return_dict=False)[0]
    torch.testing.assert_close(images.detach(), ((ref + 1) / 2).clamp(0, 1))
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())  # VAE frozen


def test_velocity_gradient_flows_to_network(adapter: ZImageAdapter):
    cond = adapter.encode_condition(list(PROMPTS))
    adapter.network.zero_grad(set_to_none=True)
    adapter.velocity(_latents(), torch.tensor([0.3, 0.7]), cond).square().mean().backward()
    grads = [p.grad for p in adapter.network.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    adapter.network.zero_grad(set_to_none=True)


def test_use_attention_keeps_outputs(adapter: ZImageAdapter):
    cond = adapter.encode_condition(list(PROMPTS))  # different lengths: padding masks in play
    x, t = _latents(), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        ref = adapter.velocity(x, t, cond)
        use_attention(adapter.network, "torch")
        try:
            assert isinstance(adapter.network.layers[0].attention.processor, OpZImageAttnProcessor)
            ours = adapter.velocity(x, t, cond)
        finally:
            restore_attention(adapter.network)
        again = adapter.velocity(x, t, cond)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_lora_targets_and_per_sample_scales(adapter: ZImageAdapter, randomize_lora):
    student = make_student(adapter, lora=LoraConfig(targets=ZIMAGE_LORA_TARGETS, rank=2))
    names = {layer.module_name for layer in student.network.modules() if hasattr(layer, "lora_A")}
    assert len(names) == 12  # q, k, v, out × (main layer, noise refiner, context refiner)
    assert {n.split(".")[0] for n in names} == {"layers", "noise_refiner", "context_refiner"}
    inject_lora(student.network, LoraConfig(targets=ZIMAGE_FEEDFORWARD_TARGETS, rank=2, adapter="ff"))
    randomize_lora(student.network)
    cond = adapter.encode_condition(list(PROMPTS))
    x, t = _latents(), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        with lora_scale(student.network, torch.tensor([0.0, 1.0])):
            mixed = student.velocity(x, t, cond)
        with lora_scale(student.network, 0.0):
            off = student.velocity(x, t, cond)
        on = student.velocity(x, t, cond)
        teacher = adapter.velocity(x, t, cond)
    torch.testing.assert_close(off, teacher, rtol=0, atol=1e-6)
    assert not torch.allclose(on, teacher, atol=1e-4)
    torch.testing.assert_close(mixed, torch.cat([off[:1], on[1:]]), rtol=1e-5, atol=1e-5)


def test_drop_text_encoders():
    pipe = _pipeline()  # its own pipeline: dropping mutates it
    adapter = ZImageAdapter.from_pipeline(pipe, resolution=16, max_sequence_length=TOKENS)
    fingerprint = adapter.text_fingerprint()
    assert fingerprint["family"] == "zimage" and fingerprint["max_sequence_length"] == TOKENS
    assert fingerprint["text_encoder"].startswith("Qwen3Model:") and "tokenizer" in fingerprint
    null = adapter.encode_condition([""])
    adapter.drop_text_encoders()
    assert pipe.text_encoder is None and not adapter.can_encode and len(adapter.text_encoders) == 0
    with pytest.raises(ValueError, match="text encoders were dropped"):
        adapter.encode_condition(list(PROMPTS))
    torch.testing.assert_close(
        adapter.null_condition(2).prompt_embeds[1:], null.prompt_embeds, rtol=0, atol=0
    )
    assert adapter.text_fingerprint() == fingerprint
    with pytest.raises(ValueError, match="without a pipeline"):
        ZImageAdapter(pipe.transformer, vae=pipe.vae).encode_condition("a cat")


def test_from_pretrained_roundtrip(adapter: ZImageAdapter, pipe: ZImagePipeline, tmp_path: Path):
    pipe.save_pretrained(tmp_path / "zimage")
    loaded = ZImageAdapter.from_pretrained(tmp_path / "zimage", resolution=16, max_sequence_length=TOKENS)
    assert loaded.shift == SHIFT and loaded.sample_shape == adapter.sample_shape
    assert loaded.text_fingerprint() == adapter.text_fingerprint()
    x, t = _latents(), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.velocity(x, t, loaded.encode_condition(list(PROMPTS))),
            adapter.velocity(x, t, adapter.encode_condition(list(PROMPTS))),
        )


def test_make_student_shares_frozen_modules(adapter: ZImageAdapter):
    student = make_student(adapter)
    assert student.network is not adapter.network
    assert student.vae.decoder.conv_out.weight is adapter.vae.decoder.conv_out.weight
    teacher_text = {id(p) for p in adapter.text_encoders.parameters()}
    assert teacher_text and all(id(p) in teacher_text for p in student.text_encoders.parameters())
    cond = student.encode_condition(list(PROMPTS))
    x, t = _latents(), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, cond), adapter.velocity(x, t, cond), rtol=0, atol=0)


def test_gradient_checkpointing_keeps_outputs_and_gradients(adapter: ZImageAdapter):
    student = make_student(adapter)  # a copy: the fixture's transformer stays as it is
    cond = adapter.encode_condition(list(PROMPTS))
    x, t = _latents(), torch.tensor([0.3, 0.7])

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        student.network.zero_grad(set_to_none=True)
        v = student.velocity(x, t, cond)
        v.square().mean().backward()
        return v.detach(), student.network.layers[0].attention.to_q.weight.grad.clone()

    v_ref, g_ref = run()
    student.enable_memory_savers(gradient_checkpointing=True, vae_slicing=True)
    assert student.network.gradient_checkpointing
    v_ckpt, g_ckpt = run()
    torch.testing.assert_close(v_ckpt, v_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_ckpt, g_ref, rtol=1e-5, atol=1e-7)
