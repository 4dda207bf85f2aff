"""SDXLAdapter on a tiny random SDXL pipeline assembled offline (two tiny CLIPs, tiny UNet and VAE)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
)
from torch import nn

from dmdr_fast.conditions import cat_conds, slice_cond
from dmdr_fast.models import (
    FlowModelAdapter,
    LoraConfig,
    inject_lora,
    make_student,
    restore_attention,
    use_attention,
)
from dmdr_fast.models.sdxl import SDXL_LORA_TARGETS, SDXLAdapter, SDXLCondition
from dmdr_fast.pipelines.random import build_random_pipeline

TOKENS = 8  # CLIP tokenizer length (77 for SDXL)
PROMPTS = ["a cat", "the dog"]
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _pipeline(folder: Path) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline of ``dmdr-fast make-pipeline --family sdxl`` (two 8-wide CLIPs, a
    2-block text-time UNet, a 2-block VAE with SDXL's scaling factor, SDXL's Euler scheduler)."""
    pipe = build_random_pipeline("sdxl", "tiny", folder)
    assert pipe.scheduler.config.beta_schedule == SDXL_SCHEDULER["beta_schedule"]
    return pipe


def _variant(pipe: StableDiffusionXLPipeline, **kwargs) -> StableDiffusionXLPipeline:
    """A new pipeline object sharing ``pipe``'s modules (with some components / config replaced)."""
    force_zeros = kwargs.pop("force_zeros_for_empty_prompt", True)
    components = {**pipe.components, **kwargs}
    return StableDiffusionXLPipeline(
        **components, force_zeros_for_empty_prompt=force_zeros, add_watermarker=False
    )


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionXLPipeline:
    return _pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def adapter(pipe: StableDiffusionXLPipeline) -> SDXLAdapter:
    return SDXLAdapter.from_pipeline(pipe)


def _latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _flow_time(alphas_cumprod: torch.Tensor, tau: int) -> float:
    """``t(τ) = σ_τ / (α_τ + σ_τ)``."""
    a = alphas_cumprod[tau].double()
    return float((1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt()))


def _unet(pipe: StableDiffusionXLPipeline, x_vp: torch.Tensor, tau, cond: SDXLCondition) -> torch.Tensor:
    added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.add_time_ids}
    return pipe.unet(x_vp, tau, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added)[0]


class OracleUNet(nn.Module):
    """Returns the true ε (or the true VP velocity ``α·ε − σ·x0``) of a known ``x_t``."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        c = torch.rsqrt((1 - t) ** 2 + t**2).view(-1, 1, 1, 1)
        alpha, sigma = (1 - t).view(-1, 1, 1, 1) * c, t.view(-1, 1, 1, 1) * c
        self.out = eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        self.calls.append((sample, timestep))
        return (self.out.to(sample.dtype),)


def test_construction_and_shapes(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    assert isinstance(adapter, FlowModelAdapter)
    assert adapter.network is pipe.unet and adapter.family == "sdxl" and adapter.lora_prefix == "unet"
    assert adapter.sample_shape == (4, 8, 8)  # 16 px / VAE factor 2
    assert adapter.prediction_type == "epsilon" and adapter.tau_max == 999
    assert abs(adapter.t_max - 0.936) < 1e-3
    assert SDXLAdapter.from_pipeline(pipe, resolution=(32, 16)).sample_shape == (4, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        SDXLAdapter.from_pipeline(pipe, resolution=17)
    with pytest.raises(TypeError):
        SDXLAdapter(nn.Linear(2, 2), pipeline=pipe)
    cond = adapter.encode_condition(PROMPTS)
    assert isinstance(cond, SDXLCondition) and len(cond) == 2
    assert cond.prompt_embeds.shape == (2, TOKENS, 16)
    assert cond.pooled_prompt_embeds.shape == (2, 4) and cond.add_time_ids.shape == (2, 6)
    v = adapter.velocity(_latents(), torch.tensor([0.3, 1.0]), cond)
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="SDXLCondition"):
        adapter.velocity(_latents(), torch.tensor([0.3, 0.9]), torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        adapter.velocity(_latents(3), torch.tensor([0.3, 0.9, 0.1]), cond)
    settings = adapter.text_fingerprint()
    assert settings["family"] == "sdxl" and settings["target_size"] == [16, 16]


def test_encode_condition_and_time_ids_match_pipeline(pipe: StableDiffusionXLPipeline):
    adapter = SDXLAdapter.from_pipeline(pipe, resolution=(32, 16), original_size=(64, 48))
    cond = adapter.encode_condition(PROMPTS)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((64, 48), (0, 0), (32, 16), dtype=pe.dtype, text_encoder_projection_dim=4)
    torch.testing.assert_close(cond.add_time_ids, ids.repeat(2, 1), rtol=0, atol=0)
    assert cond.add_time_ids[0].tolist() == [64, 48, 0, 0, 32, 16]
    assert not cond.prompt_embeds.requires_grad
    assert adapter.encode_condition("a cat").prompt_embeds.shape[0] == 1


def test_time_mapping_recovers_integer_timesteps(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    acp = pipe.scheduler.alphas_cumprod
    taus = [0, 1, 259, 500, 759, 998, 999]
    t = torch.tensor([_flow_time(acp, k) for k in taus], dtype=torch.float64)
    tau, alpha, sigma = adapter.vp_parameters(t)
    torch.testing.assert_close(tau, torch.tensor(taus, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha**2, acp[taus].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert adapter.t_max == pytest.approx(_flow_time(acp, 999), rel=1e-9)
    # Monotone between integers, clamped to [0, τ_max] at both ends; the UNet takes float timesteps.
    tau, _, _ = adapter.vp_parameters(torch.tensor([0.0, 0.01, 0.3, 0.31, 0.95, 1.0]))
    assert tau[0] == 0 and tau[1] == 0 and 0 < tau[2] < tau[3] < 999 and tau[4] == tau[5] == 999
    cond = adapter.encode_condition(PROMPTS)
    with torch.no_grad():
        x = _latents()
        torch.testing.assert_close(
            _unet(pipe, x, torch.tensor(500), cond), _unet(pipe, x, torch.tensor(500.0), cond)
        )
        assert not torch.equal(
            _unet(pipe, x, torch.tensor(500.0), cond), _unet(pipe, x, torch.tensor(500.5), cond)
        )


def test_unclamped_branch_matches_vp_formula(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    cond = adapter.encode_condition(PROMPTS)
    x = _latents()
    with torch.no_grad():
        for t in (torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.02]), torch.tensor([0.0, 0.7])):
            v = adapter.velocity(x, t, cond)
            tau, alpha, sigma = (p.float().view(-1, 1, 1, 1) for p in adapter.vp_parameters(t))
            x_vp = x * torch.rsqrt((1 - t) ** 2 + t**2).view(-1, 1, 1, 1)
            eps = _unet(pipe, x_vp, tau.flatten(), cond)
            tv = t.view(-1, 1, 1, 1)
            # Below t(τ=0) ≈ 0.028 the timestep is held at 0 and x̂0 stays the flow formula.
            low = (t < _flow_time(pipe.scheduler.alphas_cumprod, 0)).view(-1, 1, 1, 1)
            x0_vp = torch.where(low, (x - tv * eps) / (1 - tv), (x_vp - sigma * eps) / alpha)
            torch.testing.assert_close(x - tv * v, x0_vp, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, eps - (x - tv * eps) / (1 - tv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_oracle_gives_true_velocity(pipe: StableDiffusionXLPipeline, prediction_type: str):
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER, prediction_type=prediction_type)
    adapter = SDXLAdapter.from_pipeline(_variant(pipe, scheduler=scheduler))
    assert adapter.prediction_type == prediction_type
    cond = adapter.encode_condition(PROMPTS)
    x0, eps = _latents(seed=1), _latents(seed=2)
    for t in (torch.tensor([0.05, 0.5]), torch.tensor([0.8, 0.93])):
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        adapter.unet = OracleUNet(x0, eps, t, prediction_type)
        v = adapter.velocity(x_t, t, cond)
        torch.testing.assert_close(v, eps - x0, rtol=1e-5, atol=1e-5)
        sample, tau = adapter.unet.calls[0]
        _, alpha, sigma = adapter.vp_parameters(t)
        vp = alpha.float().view(-1, 1, 1, 1) * x0 + sigma.float().view(-1, 1, 1, 1) * eps
        torch.testing.assert_close(sample, vp, rtol=1e-5, atol=1e-5)  # a true VP sample at τ(t)
        assert tau.dtype == torch.float32 and tau.shape == (2,)


def test_clamped_branch_and_continuity(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    cond = adapter.encode_condition(PROMPTS)
    acp = pipe.scheduler.alphas_cumprod
    a_max, s_max = acp[999].sqrt(), (1 - acp[999]).sqrt()
    noise = _latents(seed=3)
    with torch.no_grad():
        for t in (1.0, 0.97):
            v = adapter.velocity(noise, t, cond)
            x_vp = noise / (((1 - t) ** 2 + t**2) ** 0.5)  # = noise at t = 1, what SDXL samplers feed
            eps = _unet(pipe, x_vp, torch.tensor(999), cond)  # the pipelines' integer first step
            x0 = (x_vp - s_max * eps) / a_max
            torch.testing.assert_close(v, (noise - x0) / t, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(noise - t * v, x0, rtol=1e-5, atol=1e-4)
        # Continuity at t_max: the gap between the branches on either side shrinks linearly with the
        # distance (a jump would not); the velocity is steep there (x̂0 carries 1/α_max ≈ 15).
        one = slice_cond(cond, 0, 1)
        pair, x = cat_conds([one, one]), torch.cat([noise[:1], noise[:1]])
        gaps = []
        for d in (1e-3, 1e-5):
            v = adapter.velocity(x, torch.tensor([adapter.t_max - d, adapter.t_max + d]), pair)
            gaps.append(float((v[0] - v[1]).abs().max()))
        assert gaps[1] < 0.05 * gaps[0] and gaps[1] < 0.05


def test_null_condition_follows_force_zeros(pipe: StableDiffusionXLPipeline, monkeypatch: pytest.MonkeyPatch):
    adapter = SDXLAdapter.from_pipeline(pipe)  # force_zeros_for_empty_prompt=True (SDXL default)
    calls = []
    original = pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", counting)
    null3, null1 = adapter.null_condition(3), adapter.null_condition(1)
    assert calls == [[""]] and len(null3) == 3 and len(null1) == 1
    assert not null3.prompt_embeds.any() and not null3.pooled_prompt_embeds.any()
    torch.testing.assert_close(
        null3.add_time_ids, adapter.encode_condition(PROMPTS[:1]).add_time_ids.expand(3, 6)
    )
    monkeypatch.undo()
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=True)
    torch.testing.assert_close(null1.prompt_embeds, neg, rtol=0, atol=0)
    torch.testing.assert_close(null1.pooled_prompt_embeds, neg_pooled, rtol=0, atol=0)

    encoded = _variant(pipe, force_zeros_for_empty_prompt=False)
    adapter = SDXLAdapter.from_pipeline(encoded)
    null = adapter.null_condition(1)
    _, neg, _, neg_pooled = encoded.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=True)
    assert null.prompt_embeds.abs().sum() > 0
    torch.testing.assert_close(null.prompt_embeds, neg, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled_prompt_embeds, neg_pooled, rtol=0, atol=0)
    empty = adapter.encode_condition([""])
    torch.testing.assert_close(null.prompt_embeds, empty.prompt_embeds, rtol=0, atol=0)
    adapter.set_null_condition(SDXLAdapter.from_pipeline(pipe).null_condition(1))
    assert not adapter.null_condition(2).prompt_embeds.any()
    assert adapter.text_fingerprint()["force_zeros_for_empty_prompt"] is False


def test_cat_and_slice_conditions(adapter: SDXLAdapter):
    a, b = adapter.encode_condition(PROMPTS), adapter.null_condition(1)
    c = cat_conds([a, b, a])
    assert len(c) == 5 and c.add_time_ids.shape == (5, 6)
    torch.testing.assert_close(slice_cond(c, 2, 3).prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(slice_cond(c, 3, 5).pooled_prompt_embeds, a.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="shapes"):
        cat_conds([a, SDXLCondition(a.prompt_embeds[:, :4], a.pooled_prompt_embeds, a.add_time_ids)])


def test_decode_range_gradient_and_upcast(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    x = _latents().requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(x / 0.13025, return_dict=False)[0]
    torch.testing.assert_close(images.detach(), ((ref + 1) / 2).clamp(0, 1))
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())
    vae16 = copy.deepcopy(pipe.vae).half()
    assert vae16.config.force_upcast
    upcast = SDXLAdapter(pipe.unet, vae=vae16, scheduler=pipe.scheduler)
    out = upcast.decode(x.detach())
    assert vae16.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, images.detach(), rtol=1e-2, atol=1e-2)  # fp16-rounded weights


def test_few_step_grid_and_export_scheduler(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    acp = pipe.scheduler.alphas_cumprod
    torch.testing.assert_close(adapter.few_step_grid(1, 3.0), torch.tensor([1.0, 0.0]))
    grid = adapter.few_step_grid(4, 1.0)
    sched = adapter.export_scheduler(4, 1.0)
    assert isinstance(sched, LCMScheduler) and sched.init_noise_sigma == 1.0
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    expected = [1.0, *(_flow_time(acp, k) for k in (759, 499, 259)), 0.0]
    torch.testing.assert_close(grid, torch.tensor(expected))
    torch.testing.assert_close(sched.alphas_cumprod, acp, rtol=0, atol=0)
    assert sched.get_scalings_for_boundary_condition_discrete(259)[0] < 1e-7  # c_skip
    assert adapter.pipeline_call_kwargs(4) == {"num_inference_steps": 4, "guidance_scale": 0.0}


def test_noise_timestep_calls_the_unet_at_dmd2s_conditioning_timestep(
    adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline
):
    student = make_student(adapter)
    student.set_noise_timestep(399)
    assert adapter.noise_timestep is None  # the teacher it was copied from is untouched
    cond = adapter.encode_condition(PROMPTS)
    acp = pipe.scheduler.alphas_cumprod
    a, s = acp[399].sqrt(), (1 - acp[399]).sqrt()
    noise = _latents(seed=5)
    with torch.no_grad():
        v = student.velocity(noise, torch.ones(2), cond)
        eps = _unet(pipe, noise, torch.tensor(399), cond)  # DMD2: unet(noise, 399) → get_x0_from_noise
        torch.testing.assert_close(noise - v, (noise - s * eps) / a, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(v, adapter.velocity(noise, torch.ones(2), cond), atol=1e-3)
        # Other times (also mixed into one batch with t = 1) are the teacher's conversion.
        t = torch.tensor([0.97, 1.0])
        mixed = student.velocity(noise, t, cond)
        torch.testing.assert_close(mixed[0], adapter.velocity(noise, t, cond)[0], rtol=0, atol=0)
        torch.testing.assert_close(mixed[1], v[1], rtol=1e-6, atol=1e-6)
    assert student.few_step_grid(1, 1.0).tolist() == adapter.few_step_grid(1, 1.0).tolist()
    assert student.pipeline_call_kwargs(1) == {"timesteps": [399], "guidance_scale": 0.0}
    student.set_noise_timestep(900)
    assert student.pipeline_call_kwargs(4)["timesteps"] == [900, 759, 499, 259]
    student.set_noise_timestep(500)
    with pytest.raises(ValueError, match="strictly descending"):
        student.pipeline_call_kwargs(4)  # 500 is below LCM's second timestep 759
    for bad in (0, 1000, 3.5, True):
        with pytest.raises(ValueError, match="noise timestep must be an integer"):
            student.set_noise_timestep(bad)
    student.set_noise_timestep(None)
    assert student.pipeline_call_kwargs(1) == {"num_inference_steps": 1, "guidance_scale": 0.0}


@pytest.mark.parametrize(
    ("steps", "noise_timestep", "prediction_type"),
    [
        (1, None, "epsilon"), (4, None, "epsilon"), (1, 399, "epsilon"), (4, 900, "epsilon"),
        (1, 399, "v_prediction"), (4, 900, "v_prediction"),
    ],
)  # fmt: skip
def test_exported_lcm_pipeline_matches_few_step_sampler(
    adapter: SDXLAdapter,
    pipe: StableDiffusionXLPipeline,
    steps: int,
    noise_timestep: int | None,
    prediction_type: str,
):
    if prediction_type != "epsilon":  # the export's LCMScheduler carries the prediction type
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER, prediction_type=prediction_type)
        adapter = SDXLAdapter.from_pipeline(_variant(pipe, scheduler=scheduler))
    adapter.set_noise_timestep(noise_timestep)  # a fresh adapter per test (function-scoped fixture)
    noise = _latents(seed=4)
    exported = _variant(pipe, scheduler=adapter.export_scheduler(steps, 1.0))
    with torch.no_grad():
        ref = exported(
            PROMPTS,
            height=16,
            width=16,
            latents=noise.clone(),
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
            **adapter.pipeline_call_kwargs(steps),
        ).images
        cond, grid = adapter.encode_condition(PROMPTS), adapter.few_step_grid(steps, 1.0)
        g, x = torch.Generator().manual_seed(7), noise
        for k in range(steps):
            x0 = x - grid[k] * adapter.velocity(x, grid[k].expand(2), cond)
            x = (
                (1 - grid[k + 1]) * x0 + grid[k + 1] * torch.randn(x.shape, generator=g)
                if k < steps - 1
                else x0
            )
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_euler_cfg_pipeline_matches_adapter_loop(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline):
    # Euler (k-diffusion σ = σ_τ/α_τ, i.e. t = σ/(1+σ)) with CFG against flow Euler on our velocity; the
    # zero null condition is the pipeline's negative branch (force_zeros_for_empty_prompt).
    guidance, steps, noise = 3.0, 2, _latents()
    with torch.no_grad():
        ref = pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.clone(),
            height=16,
            width=16,
            output_type="latent",
        ).images
        sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        t = sched.sigmas / (1 + sched.sigmas)
        x = noise * sched.init_noise_sigma * (1 - t[0])
        both = cat_conds([adapter.null_condition(2), adapter.encode_condition(PROMPTS)])
        for i in range(steps):
            v_uncond, v_cond = adapter.velocity(torch.cat([x, x]), t[i].expand(4), both).chunk(2)
            x = x + (t[i + 1] - t[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_lora_targets_match_tiny_unet(pipe: StableDiffusionXLPipeline):
    unet = copy.deepcopy(pipe.unet)
    names = inject_lora(unet, LoraConfig(targets=SDXL_LORA_TARGETS, rank=2))
    kinds = {type(m.base_layer).__name__ for n, m in unet.named_modules() if n in names}
    assert kinds == {"Linear", "Conv2d"} and len(names) > len(SDXL_LORA_TARGETS)


def test_drop_text_encoders_then_encode_raises(pipe: StableDiffusionXLPipeline):
    adapter = SDXLAdapter.from_pipeline(_variant(pipe))
    fingerprint = adapter.text_fingerprint()
    adapter.drop_text_encoders()
    assert not adapter.can_encode and adapter.pipeline.text_encoder is None and pipe.text_encoder is not None
    with pytest.raises(ValueError, match="dropped"):
        adapter.encode_condition(PROMPTS)
    assert not adapter.null_condition(2).prompt_embeds.any()  # cached before dropping
    assert adapter.text_fingerprint() == fingerprint


def test_velocity_gradient_and_make_student(adapter: SDXLAdapter):
    cond = adapter.encode_condition(PROMPTS)
    student = make_student(adapter)
    assert student.network is not adapter.network
    assert student.vae.decoder.conv_out.weight is adapter.vae.decoder.conv_out.weight
    x, t = _latents(), torch.tensor([0.3, 0.99])
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(x, t, cond), adapter.velocity(x, t, cond), rtol=0, atol=0)
    x = x.requires_grad_(True)
    student.velocity(x, torch.tensor([0.0, 1.0]), cond).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.network.parameters())


def test_from_pretrained_roundtrip(adapter: SDXLAdapter, pipe: StableDiffusionXLPipeline, tmp_path: Path):
    pipe.save_pretrained(tmp_path / "sdxl")
    loaded = SDXLAdapter.from_pretrained(tmp_path / "sdxl")
    assert loaded.sample_shape == adapter.sample_shape and loaded.t_max == adapter.t_max
    x, t = _latents(), torch.tensor([0.4, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.velocity(x, t, loaded.encode_condition(PROMPTS)),
            adapter.velocity(x, t, adapter.encode_condition(PROMPTS)),
        )


def test_use_attention_and_checkpointing_keep_outputs(pipe: StableDiffusionXLPipeline):
    adapter = SDXLAdapter.from_pipeline(_variant(pipe, unet=copy.deepcopy(pipe.unet)))
    cond = adapter.encode_condition(PROMPTS)
    x, t = _latents(), torch.tensor([0.2, 0.97])
    with torch.no_grad():
        ref = adapter.velocity(x, t, cond)
        use_attention(adapter.network, "torch")
        try:
            ours = adapter.velocity(x, t, cond)
        finally:
            restore_attention(adapter.network)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    adapter.enable_memory_savers(gradient_checkpointing=True, vae_slicing=True)
    adapter.network.train()
    out = adapter.velocity(x, t, cond)
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    assert any(p.grad is not None for p in adapter.network.parameters())


def test_sample_exported_keeps_the_noise_timestep_when_steps_change(pipe: StableDiffusionXLPipeline):
    from dmdr_fast.pipelines.export import sample_exported

    exported = _variant(pipe, scheduler=SDXLAdapter.from_pipeline(pipe).export_scheduler(1, 1.0))
    exported.set_progress_bar_config(disable=True)
    info = {"call_kwargs": {"timesteps": [900], "guidance_scale": 0.0, "height": 16, "width": 16}}
    images = sample_exported(exported, info, PROMPTS, steps=4)
    assert images.shape == (2, 3, 16, 16)
    assert exported.scheduler.timesteps.tolist() == [900, 759, 499, 259]  # N LCM steps from τ_n
    sample_exported(exported, info, PROMPTS)  # the exported count: one step at 900
    assert exported.scheduler.timesteps.tolist() == [900]
    info["call_kwargs"]["timesteps"] = [399]
    with pytest.raises(ValueError, match="strictly descending"):
        sample_exported(exported, info, PROMPTS, steps=4)  # 399 lies below LCM's second timestep


def test_the_expected_first_timestep_warning_is_silenced_only_while_sampling(pipe: StableDiffusionXLPipeline):
    import logging

    from dmdr_fast.pipelines.export import sample_exported

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.schedulers.scheduling_lcm")
    logger.addHandler(handler)
    try:
        exported = _variant(pipe, scheduler=SDXLAdapter.from_pipeline(pipe).export_scheduler(1, 1.0))
        exported.set_progress_bar_config(disable=True)
        info = {"call_kwargs": {"timesteps": [399], "guidance_scale": 0.0, "height": 16, "width": 16}}
        sample_exported(exported, info, PROMPTS)
        assert not any("first timestep" in m for m in records)
        exported.scheduler.set_timesteps(timesteps=[399])  # outside: diffusers' warning is back
        assert any("first timestep" in m for m in records)
    finally:
        logger.removeHandler(handler)
