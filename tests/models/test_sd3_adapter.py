"""SD3Adapter on the library's tiny random SD3 pipeline without T5 (two tiny CLIPs, tiny VAE).

The pipeline is ``build_random_pipeline("sd3", "tiny", folder, t5=False)``: the one
``dmdr-fast make-pipeline --family sd3`` writes, with ``text_encoder_3`` and ``tokenizer_3`` left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from dmdr_fast.conditions import cat_conds, slice_cond
from dmdr_fast.models import FlowModelAdapter, make_student, restore_attention, use_attention
from dmdr_fast.models.sd3 import SD3Adapter, SD3Condition
from dmdr_fast.pipelines.random import build_random_pipeline

TOKENS = 8  # CLIP tokenizer length (pipeline's tokenizer_max_length)
T5_TOKENS = 3  # zero T5 tokens appended by encode_prompt when text_encoder_3 is None
PROMPTS = ["a cat", "the dog"]


def _pipeline(folder: Path) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline without T5: two 8-wide CLIPs (projections 4), a 2-layer transformer of
    joint width 16 = 8 + 8 and pooled width 8 = 4 + 4, a 2-block VAE with SD3's scaling/shift."""
    pipe = build_random_pipeline("sd3", "tiny", folder, t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer_max_length == TOKENS
    config = pipe.transformer.config
    assert (config.joint_attention_dim, config.pooled_projection_dim) == (16, 8)
    return pipe


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusion3Pipeline:
    return _pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture
def adapter(pipe: StableDiffusion3Pipeline) -> SD3Adapter:
    return SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)


def _latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_construction_and_shapes(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    assert isinstance(adapter, FlowModelAdapter)
    assert adapter.network is pipe.transformer
    assert adapter.sample_shape == (4, 8, 8)  # 16 px / VAE factor 2
    assert adapter.shift == 3.0 and adapter.num_train_timesteps == 1000
    assert SD3Adapter.from_pipeline(pipe, resolution=(32, 16)).sample_shape == (4, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        SD3Adapter.from_pipeline(pipe, resolution=18)
    cond = adapter.encode_condition(PROMPTS)
    assert isinstance(cond, SD3Condition)
    assert cond.prompt_embeds.shape == (2, TOKENS + T5_TOKENS, 16)
    assert cond.pooled_projections.shape == (2, 8)
    v = adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), cond)
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="SD3Condition"):
        adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        adapter.velocity(_latents(3), torch.tensor([0.3, 0.9, 0.1]), cond)


def test_encode_condition_matches_pipeline(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    cond = adapter.encode_condition(PROMPTS)
    pe, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
    )
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_projections, pooled, rtol=0, atol=0)
    assert not cond.prompt_embeds.requires_grad
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert adapter.encode_condition("a cat").prompt_embeds.shape[0] == 1


def test_velocity_matches_direct_transformer_call(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    cond = adapter.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = adapter.velocity(x, t, cond)
        ref = pipe.transformer(
            hidden_states=x,
            timestep=t * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_projections,
            return_dict=False,
        )[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        torch.testing.assert_close(
            adapter.velocity(x, 0.5, cond), adapter.velocity(x, torch.full((2,), 0.5), cond)
        )


def test_noise_convention_matches_scheduler(pipe: StableDiffusion3Pipeline):
    # FlowMatchEulerDiscreteScheduler.scale_noise: x_σ = σ·ε + (1 − σ)·x0, i.e. t = σ.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    x0, eps = _latents(seed=1), _latents(seed=2)
    for i in (0, 2):
        sigma = sched.sigmas[i]
        x_t = sched.scale_noise(x0, sched.timesteps[i : i + 1], eps)
        torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
        torch.testing.assert_close(sched.timesteps[i], sigma * 1000)


def test_euler_step_matches_scheduler(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    cond = adapter.encode_condition(PROMPTS)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(3)
    x = _latents()
    with torch.no_grad():
        for i, timestep in enumerate(sched.timesteps):
            noise_pred = pipe.transformer(
                hidden_states=x,
                timestep=timestep.expand(2),
                encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_projections,
                return_dict=False,
            )[0]
            ref = sched.step(noise_pred, timestep, x, return_dict=False)[0]
            t, t_next = sched.sigmas[i], sched.sigmas[i + 1]
            ours = x + (t_next - t) * adapter.velocity(x, t.expand(2), cond)
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
            x = ref
    # The shift warps only the schedule: σ_i = shift·s_i / (1 + (shift − 1)·s_i), s_i uniform from 1 to
    # the scheduler's sigma_min (which diffusers stores already shifted, shift(1/1000)).
    s = torch.linspace(1.0, float(sched.sigma_min), 3)
    torch.testing.assert_close(sched.sigmas[:-1], adapter.shift_time(s), rtol=1e-5, atol=1e-6)


def test_pipeline_sampling_with_cfg_matches_adapter_loop(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    # End to end: the pipeline's CFG sampler (negative prompt "" by default) against an Euler loop on
    # our velocity with null_condition as the unconditional branch.
    guidance, steps = 3.0, 2
    x = _latents()
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=x.clone(),
            height=16,
            width=16,
            max_sequence_length=T5_TOKENS,
            output_type="latent",
        ).images
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        both = cat_conds([adapter.null_condition(2), adapter.encode_condition(PROMPTS)])
        for i in range(steps):
            t = sched.sigmas[i].expand(4)
            v_uncond, v_cond = adapter.velocity(torch.cat([x, x]), t, both).chunk(2)
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_null_condition_cached(adapter: SD3Adapter, monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = adapter.pipeline.encode_prompt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("prompt", args[0] if args else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.pipeline, "encode_prompt", counting)
    null3 = adapter.null_condition(3)
    null1 = adapter.null_condition(1)
    assert calls == [[""]]
    assert null3.prompt_embeds.shape == (3, TOKENS + T5_TOKENS, 16) and null3.pooled_projections.shape == (
        3,
        8,
    )
    empty = adapter.encode_condition([""])
    for i in range(3):
        torch.testing.assert_close(null3.prompt_embeds[i : i + 1], empty.prompt_embeds, rtol=0, atol=0)
        torch.testing.assert_close(
            null3.pooled_projections[i : i + 1], empty.pooled_projections, rtol=0, atol=0
        )
    torch.testing.assert_close(null1.prompt_embeds, empty.prompt_embeds, rtol=0, atol=0)
    assert "_null_prompt_embeds" not in adapter.state_dict()


def test_cat_and_slice_conditions(adapter: SD3Adapter):
    a, b = adapter.encode_condition(PROMPTS), adapter.null_condition(1)
    c = cat_conds([a, b, a])
    assert c.prompt_embeds.shape[0] == 5 and c.pooled_projections.shape[0] == 5
    torch.testing.assert_close(slice_cond(c, 2, 3).prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(slice_cond(c, 3, 5).pooled_projections, a.pooled_projections)
    short = SD3Condition(a.prompt_embeds[:, :4], a.pooled_projections)
    with pytest.raises(ValueError, match="shapes"):
        cat_conds([a, short])
    with pytest.raises(ValueError):
        cat_conds([])


def test_decode_range_and_gradient(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline):
    x = _latents().requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(x / 1.5305 + 0.0609, return_dict=False)[0]
    torch.testing.assert_close(images.detach(), ((ref + 1) / 2).clamp(0, 1))
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())  # VAE frozen


def test_velocity_gradient_flows_to_network(adapter: SD3Adapter):
    cond = adapter.encode_condition(PROMPTS)
    adapter.network.zero_grad(set_to_none=True)
    adapter.velocity(_latents(), torch.tensor([0.3, 0.7]), cond).square().mean().backward()
    grads = [p.grad for p in adapter.network.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    adapter.network.zero_grad(set_to_none=True)


def test_use_attention_keeps_outputs(adapter: SD3Adapter):
    cond = adapter.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        ref = adapter.velocity(x, t, cond)
        use_attention(adapter.network, "torch")
        try:
            ours = adapter.velocity(x, t, cond)
        finally:
            restore_attention(adapter.network)
        again = adapter.velocity(x, t, cond)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_from_pretrained_roundtrip(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline, tmp_path: Path):
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = SD3Adapter.from_pretrained(tmp_path / "sd3", load_t5=False, max_sequence_length=T5_TOKENS)
    assert loaded.shift == 3.0 and loaded.sample_shape == adapter.sample_shape
    x, t = _latents(), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.velocity(x, t, loaded.encode_condition(PROMPTS)),
            adapter.velocity(x, t, adapter.encode_condition(PROMPTS)),
        )


def test_make_student_shares_frozen_modules(adapter: SD3Adapter):
    student = make_student(adapter)
    assert student.network is not adapter.network
    assert student.vae.decoder.conv_out.weight is adapter.vae.decoder.conv_out.weight
    teacher_text = {id(p) for p in adapter.text_encoders.parameters()}
    assert teacher_text and all(id(p) in teacher_text for p in student.text_encoders.parameters())
    cond = student.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, cond), adapter.velocity(x, t, cond), rtol=0, atol=0)
