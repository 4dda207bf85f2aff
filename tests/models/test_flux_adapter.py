"""FluxAdapter on the library's tiny random Flux pipelines (tiny CLIP + T5, tiny VAE).

Two variants from ``build_random_pipeline("flux", "tiny", folder, guidance_embeds=...)``:
``guided`` (``guidance_embeds=True``, like Flux-dev: the pipeline ``dmdr-fast make-pipeline --family
flux`` writes) and ``plain`` (no guidance embeds, like Flux-schnell). Only the transformers differ;
both have the same text encoders, VAE and (Flux-dev's, dynamic-shift) scheduler.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from dmdr_fast.conditions import cat_conds, slice_cond
from dmdr_fast.models import (
    FlowModelAdapter,
    LoraConfig,
    inject_lora,
    make_student,
    restore_attention,
    use_attention,
)
from dmdr_fast.models.flux import FLUX_LORA_TARGETS, FluxAdapter, FluxCondition
from dmdr_fast.pipelines.random import build_random_pipeline

CLIP_TOKENS = 8  # CLIP tokenizer length (pipeline's tokenizer_max_length)
T5_TOKENS = 8  # max_sequence_length ("the dog" is 7 T5 tokens: no truncation)
T5_WIDTH, CLIP_WIDTH = 12, 8  # joint_attention_dim, pooled_projection_dim
RES = 16  # pixels; VAE factor 2 → latents (4, 8, 8) → 16 packed tokens of 16 channels
SHIFT = 3.0
PROMPTS = ["a cat", "the dog"]


def _pipelines(folder: Path) -> dict[str, FluxPipeline]:
    """The tiny Flux pipeline with (``guided``) and without (``plain``) guidance embeds."""
    pipes = {
        name: build_random_pipeline("flux", "tiny", folder / name, guidance_embeds=guided)
        for name, guided in (("plain", False), ("guided", True))
    }
    for name, pipe in pipes.items():
        config = pipe.transformer.config
        assert config.guidance_embeds == (name == "guided")
        assert (config.joint_attention_dim, config.pooled_projection_dim) == (T5_WIDTH, CLIP_WIDTH)
        assert pipe.tokenizer_max_length == CLIP_TOKENS and pipe.vae_scale_factor == 2
        assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == SHIFT
    return pipes


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FluxPipeline]:
    return _pipelines(tmp_path_factory.mktemp("flux"))


@pytest.fixture(params=["plain", "guided"])
def pipe(request: pytest.FixtureRequest, pipes: dict[str, FluxPipeline]) -> FluxPipeline:
    return pipes[request.param]


@pytest.fixture
def adapter(pipe: FluxPipeline) -> FluxAdapter:
    return FluxAdapter.from_pipeline(pipe, resolution=RES, max_sequence_length=T5_TOKENS)


def _latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _reference_velocity(pipe: FluxPipeline, x: torch.Tensor, t: torch.Tensor, cond: FluxCondition):
    """The transformer called exactly as ``FluxPipeline.__call__`` does, unpacked."""
    b, c, h, w = x.shape
    out = pipe.transformer(
        hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
        timestep=t,
        guidance=cond.guidance if pipe.transformer.config.guidance_embeds else None,
        pooled_projections=cond.pooled_projections,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 2, w * 2, 2)


def _run_pipeline(pipe: FluxPipeline, adapter: FluxAdapter, scheduler, steps: int, latents: torch.Tensor):
    """Sample with ``FluxPipeline`` (same components, given scheduler) from unpacked ``latents``."""
    runner = FluxPipeline(**{**pipe.components, "scheduler": scheduler})
    runner.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = runner(
            prompt=PROMPTS,
            height=RES,
            width=RES,
            latents=adapter.pack_latents(latents),
            output_type="latent",
            **adapter.pipeline_call_kwargs(steps),
        ).images
    return adapter.unpack_latents(out, 8, 8), runner.scheduler


def test_construction_and_shapes(adapter: FluxAdapter, pipe: FluxPipeline):
    assert isinstance(adapter, FlowModelAdapter)
    assert adapter.family == "flux" and adapter.condition_class is FluxCondition
    assert adapter.default_lora_targets == FLUX_LORA_TARGETS
    assert adapter.network is pipe.transformer
    assert adapter.sample_shape == (4, 8, 8)
    assert adapter.shift == SHIFT and adapter.num_train_timesteps == 1000
    assert FluxAdapter.from_pipeline(pipe, resolution=(32, 16)).sample_shape == (4, 16, 8)
    assert FluxAdapter.from_pipeline(pipe).sample_shape == (4, 128, 128)  # the pipeline's default size
    with pytest.raises(ValueError, match="divisible"):
        FluxAdapter.from_pipeline(pipe, resolution=18)
    cond = adapter.encode_condition(PROMPTS)
    assert isinstance(cond, FluxCondition) and len(cond) == 2
    assert cond.prompt_embeds.shape == (2, T5_TOKENS, T5_WIDTH)
    assert cond.pooled_projections.shape == (2, CLIP_WIDTH)
    assert cond.guidance.shape == (2,) and cond.guidance.dtype == torch.float32
    v = adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), cond)
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="FluxCondition"):
        adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        adapter.velocity(_latents(3), torch.tensor([0.3, 0.9, 0.1]), cond)
    with pytest.raises(ValueError, match="channels"):
        adapter.velocity(torch.zeros(2, 16, 4, 4), torch.tensor([0.3, 0.9]), cond)


def test_encode_condition_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline):
    cond = adapter.encode_condition(PROMPTS)
    pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_projections, pooled, rtol=0, atol=0)
    assert text_ids.shape == (T5_TOKENS, 3) and not text_ids.any()
    torch.testing.assert_close(cond.guidance, torch.full((2,), 3.5))
    assert not cond.prompt_embeds.requires_grad
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert adapter.encode_condition("a cat").prompt_embeds.shape[0] == 1
    other = FluxAdapter.from_pipeline(
        pipe, resolution=RES, max_sequence_length=T5_TOKENS, embedded_guidance=5.0
    )
    torch.testing.assert_close(other.encode_condition(PROMPTS).guidance, torch.full((2,), 5.0))
    assert other.text_fingerprint()["embedded_guidance"] == 5.0
    assert other.text_fingerprint() != adapter.text_fingerprint()
    assert adapter.text_fingerprint()["max_sequence_length"] == T5_TOKENS


def test_pack_unpack_match_pipeline():
    x = torch.randn(2, 4, 8, 6)
    packed = FluxAdapter.pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6), rtol=0, atol=0)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(FluxAdapter.unpack_latents(packed, 8, 6), x, rtol=0, atol=0)
    torch.testing.assert_close(
        FluxAdapter.unpack_latents(packed, 8, 6),
        FluxPipeline._unpack_latents(packed, 16, 12, 2),
        rtol=0,
        atol=0,
    )


def test_velocity_matches_direct_transformer_call(adapter: FluxAdapter, pipe: FluxPipeline):
    cond = adapter.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = adapter.velocity(x, t, cond)
        torch.testing.assert_close(ours, _reference_velocity(pipe, x, t, cond), rtol=0, atol=0)
        torch.testing.assert_close(
            adapter.velocity(x, 0.5, cond), adapter.velocity(x, torch.full((2,), 0.5), cond)
        )


def test_guidance_passed_only_with_guidance_embeds(adapter: FluxAdapter, pipe: FluxPipeline):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True
    )
    cond = adapter.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.4, 0.7])
    try:
        with torch.no_grad():
            v = adapter.velocity(x, t, cond)
            cond.guidance = torch.tensor([1.0, 7.0])
            v_other = adapter.velocity(x, t, cond)
    finally:
        handle.remove()
    if adapter.guidance_embeds:
        torch.testing.assert_close(seen[1], torch.tensor([1.0, 7.0]))
        assert not torch.allclose(v, v_other)
    else:
        assert seen == [None, None]
        torch.testing.assert_close(v, v_other, rtol=0, atol=0)


def test_null_condition_cached(adapter: FluxAdapter, monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = adapter.pipeline.encode_prompt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("prompt", args[0] if args else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.pipeline, "encode_prompt", counting)
    null3 = adapter.null_condition(3)
    null1 = adapter.null_condition(1)
    assert calls == [[""]]
    assert null3.prompt_embeds.shape == (3, T5_TOKENS, T5_WIDTH) and null3.guidance.shape == (3,)
    empty = adapter.encode_condition([""])
    for i in range(3):
        sample = slice_cond(null3, i, i + 1)
        for name in ("prompt_embeds", "pooled_projections", "guidance"):
            torch.testing.assert_close(getattr(sample, name), getattr(empty, name), rtol=0, atol=0)
    torch.testing.assert_close(null1.prompt_embeds, empty.prompt_embeds, rtol=0, atol=0)


def test_cat_and_slice_conditions(adapter: FluxAdapter):
    a, b = adapter.encode_condition(PROMPTS), adapter.null_condition(1)
    c = cat_conds([a, b, a])
    assert len(c) == 5 and c.pooled_projections.shape[0] == 5 and c.guidance.shape == (5,)
    torch.testing.assert_close(slice_cond(c, 2, 3).prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(slice_cond(c, 3, 5).pooled_projections, a.pooled_projections)
    short = FluxCondition(a.prompt_embeds[:, :4], a.pooled_projections, a.guidance)
    with pytest.raises(ValueError, match="shapes"):
        cat_conds([a, short])
    with pytest.raises(ValueError):
        cat_conds([])


def test_decode_range_and_gradient(adapter: FluxAdapter, pipe: FluxPipeline):
    x = _latents().requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (2, 3, RES, RES)
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(x / 0.3611 + 0.1159, return_dict=False)[0]
    torch.testing.assert_close(images.detach(), ((ref + 1) / 2).clamp(0, 1))
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8])
def test_few_step_grid_matches_pipeline_sigmas(adapter: FluxAdapter, pipe: FluxPipeline, steps: int):
    # FluxPipeline passes sigmas = np.linspace(1, 1/N, N) and mu; the export scheduler ignores mu.
    # (N = 3 and 6 differ by one ulp if the sigmas are made with a float32 torch.linspace.)
    _, scheduler = _run_pipeline(pipe, adapter, adapter.export_scheduler(steps, SHIFT), steps, _latents())
    grid = adapter.few_step_grid(steps, SHIFT)
    torch.testing.assert_close(scheduler.sigmas, grid, rtol=0, atol=0)
    assert grid[0] == 1 and grid[-1] == 0
    s = torch.linspace(1.0, 1.0 / steps, steps)
    torch.testing.assert_close(grid[:-1], adapter.shift_time(s, SHIFT), rtol=1e-6, atol=1e-6)


def test_pipeline_shift_matches_dynamic_scheduler(adapter: FluxAdapter, pipe: FluxPipeline):
    steps = 4
    _, scheduler = _run_pipeline(pipe, adapter, pipe.scheduler, steps, _latents())
    s = torch.linspace(1.0, 1.0 / steps, steps)
    expected = adapter.shift_time(s, adapter.pipeline_shift())
    torch.testing.assert_close(scheduler.sigmas[:-1], expected, rtol=1e-6, atol=1e-6)
    # 16 tokens < base_image_seq_len: mu < base_shift (linear in the sequence length).
    assert 1.0 < adapter.pipeline_shift() < torch.tensor(0.5).exp().item()
    # 256 px / VAE factor 2 / packing 2 → 64² = 4096 = max_image_seq_len tokens: mu = max_shift.
    assert FluxAdapter.from_pipeline(pipe, resolution=256).pipeline_shift() == pytest.approx(
        torch.tensor(1.15).exp().item()
    )


def test_pipeline_call_kwargs(adapter: FluxAdapter):
    kwargs = adapter.pipeline_call_kwargs(4)
    expected = 3.5 if adapter.guidance_embeds else 1.0
    assert kwargs == {"num_inference_steps": 4, "guidance_scale": expected, "max_sequence_length": T5_TOKENS}


def test_one_step_sample_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline):
    # The exported one-step student: x̂0 = ε − 1·v(ε, 1, c), sampled by plain FluxPipeline.
    noise = _latents(seed=5)
    ref, _ = _run_pipeline(pipe, adapter, adapter.export_scheduler(1, SHIFT), 1, noise)
    with torch.no_grad():
        ours = noise - adapter.velocity(noise, 1.0, adapter.encode_condition(PROMPTS))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The decoded image is the pipeline's image.
    runner = FluxPipeline(**{**pipe.components, "scheduler": adapter.export_scheduler(1, SHIFT)})
    runner.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = runner(
            prompt=PROMPTS,
            height=RES,
            width=RES,
            latents=adapter.pack_latents(noise),
            output_type="pt",
            **adapter.pipeline_call_kwargs(1),
        ).images
        torch.testing.assert_close(adapter.decode(ours), images, rtol=1e-5, atol=1e-5)


def test_euler_loop_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline):
    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        adapter.export_scheduler(steps, SHIFT).config, stochastic_sampling=False
    )
    x = _latents(seed=6)
    ref, _ = _run_pipeline(pipe, adapter, scheduler, steps, x)
    grid = adapter.few_step_grid(steps, SHIFT)
    cond = adapter.encode_condition(PROMPTS)
    with torch.no_grad():
        for i in range(steps):
            x = x + (grid[i + 1] - grid[i]) * adapter.velocity(x, grid[i], cond)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_stochastic_few_step_sampler_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline):
    # The export scheduler for N > 1 re-noises: x ← (1 − σ')·(x − σ·v) + σ'·z, z from the global RNG
    # (FluxPipeline does not pass its generator to scheduler.step), drawn in the packed layout.
    steps, x = 4, _latents(seed=7)
    torch.manual_seed(123)
    ref, _ = _run_pipeline(pipe, adapter, adapter.export_scheduler(steps, SHIFT), steps, x)
    grid = adapter.few_step_grid(steps, SHIFT)
    cond = adapter.encode_condition(PROMPTS)
    torch.manual_seed(123)
    with torch.no_grad():
        for i in range(steps):
            x0 = x - grid[i] * adapter.velocity(x, grid[i], cond)
            z = adapter.unpack_latents(torch.randn(2, 16, 16), 8, 8)
            x = (1 - grid[i + 1]) * x0 + grid[i + 1] * z
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_drop_text_encoders(pipe: FluxPipeline):
    own = FluxPipeline(**pipe.components)  # dropping mutates the pipeline: not the shared one
    adapter = FluxAdapter.from_pipeline(own, resolution=RES, max_sequence_length=T5_TOKENS)
    empty = adapter.encode_condition([""])
    adapter.null_condition(1)
    adapter.drop_text_encoders()
    assert own.text_encoder is None and own.text_encoder_2 is None and pipe.text_encoder is not None
    assert not adapter.can_encode and len(adapter.text_encoders) == 0
    with pytest.raises(ValueError, match="dropped"):
        adapter.encode_condition(PROMPTS)
    null = adapter.null_condition(2)
    torch.testing.assert_close(slice_cond(null, 1, 2).prompt_embeds, empty.prompt_embeds)
    with torch.no_grad():
        assert adapter.velocity(_latents(), torch.tensor([0.5, 0.5]), null).shape == (2, 4, 8, 8)


def test_lora_targets_match_tiny_flux(pipe: FluxPipeline):
    net = copy.deepcopy(pipe.transformer)
    names = inject_lora(net, LoraConfig(targets=FLUX_LORA_TARGETS, rank=2))
    assert len(names) == 8 + 4  # one double block (8 projections), one single block (q, k, v, proj_out)
    assert "proj_out" not in names and "single_transformer_blocks.0.proj_out" in names
    assert "single_transformer_blocks.0.proj_mlp" not in names


def test_velocity_gradient_flows_to_network(adapter: FluxAdapter):
    cond = adapter.encode_condition(PROMPTS)
    adapter.network.zero_grad(set_to_none=True)
    adapter.velocity(_latents(), torch.tensor([0.3, 0.7]), cond).square().mean().backward()
    grads = [p.grad for p in adapter.network.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    adapter.network.zero_grad(set_to_none=True)


def test_use_attention_keeps_outputs(adapter: FluxAdapter):
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


def test_from_pretrained_roundtrip(pipes: dict[str, FluxPipeline], tmp_path: Path):
    pipe = pipes["guided"]
    adapter = FluxAdapter.from_pipeline(pipe, resolution=RES, max_sequence_length=T5_TOKENS)
    pipe.save_pretrained(tmp_path / "flux")
    loaded = FluxAdapter.from_pretrained(tmp_path / "flux", resolution=RES, max_sequence_length=T5_TOKENS)
    assert loaded.shift == SHIFT and loaded.sample_shape == adapter.sample_shape and loaded.guidance_embeds
    x, t = _latents(), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.velocity(x, t, loaded.encode_condition(PROMPTS)),
            adapter.velocity(x, t, adapter.encode_condition(PROMPTS)),
        )


def test_make_student_shares_frozen_modules(adapter: FluxAdapter):
    student = make_student(adapter)
    assert student.network is not adapter.network
    assert student.vae.decoder.conv_out.weight is adapter.vae.decoder.conv_out.weight
    teacher_text = {id(p) for p in adapter.text_encoders.parameters()}
    assert teacher_text and all(id(p) in teacher_text for p in student.text_encoders.parameters())
    cond = student.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, cond), adapter.velocity(x, t, cond), rtol=0, atol=0)
