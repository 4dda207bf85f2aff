"""Adapter for diffusers' SDXL ``UNet2DConditionModel`` (ε- or v-prediction, VP noise schedule).

SDXL is a variance-preserving (VP) diffusion model, not a flow model. The adapter converts it to
the flow convention of :mod:`dmdr_fast.models.protocol` (``x_t = (1 − t)·x0 + t·ε``, ``t = 1`` is
noise, ``v ≈ ε − x0``) as follows (diffusers 0.42):

- VP: ``x_vp = α_τ·x0 + σ_τ·ε`` with ``α_τ² = alphas_cumprod[τ]`` (from the pipeline scheduler's
  betas) and ``σ_τ = sqrt(1 − α_τ²)``, for integer timesteps ``τ = 0 … T − 1`` (T = 1000).
- Same point up to a scale: with ``c = 1 / sqrt((1 − t)² + t²)``, ``c·x_t`` is a VP sample with
  ``α_eq = (1 − t)·c`` and ``σ_eq = t·c`` (log-SNR ``λ = 2·log((1 − t) / t)``). The flow time of a
  timestep is therefore ``t(τ) = σ_τ / (α_τ + σ_τ)``.
- Time: ``τ(t)`` is the continuous timestep with the same log-SNR, interpolated linearly in
  log-SNR between neighbouring integer timesteps (the UNet's sinusoidal ``time_proj`` accepts
  float timesteps; at an integer ``τ`` it equals the pipeline's integer call). ``τ_max = T − 1``;
  ``t_max = t(τ_max)`` (≈ 0.936 for SDXL's scaled-linear betas). Below ``t(0)`` (≈ 0.028) ``τ`` is
  held at 0.
- Unclamped, ``t ≤ t_max``: the UNet gets ``x_vp = c·x_t`` at ``τ(t)`` and predicts ``ε̂`` (for
  v-prediction ``ε̂ = α·v̂ + σ·x_vp`` with ``α, σ`` of ``τ``); then ``x̂0 = (x_t − t·ε̂) / (1 − t)``
  and ``v = ε̂ − x̂0``, exactly consistent with ``x̂0 = x_t − t·v``.
- Clamped, ``t > t_max`` (includes ``t = 1``): the UNet gets ``x_vp = c·x_t`` at ``τ_max`` (at
  ``t = 1`` that is ``x_vp = ε``, what SDXL samplers feed at their first step); then
  ``x̂0 = (x_vp − σ_max·ε̂) / α_max`` and ``v = (x_t − x̂0) / t``. Both branches agree at ``t_max``;
  the choice is per sample. The conversion runs in float32 (the ``(B,)`` time lookup in float64).
- Noise timestep (students only, :meth:`SDXLAdapter.set_noise_timestep`): DMD2's 1-step SDXL
  generator is called on pure noise with a *conditioning timestep* ``τ_n`` (399) instead of
  ``τ_max``: at ``t = 1`` the UNet then gets ``x_vp = ε`` at ``τ_n`` and ``x̂0 = (ε − σ_n·ε̂) / α_n``
  (DMD2's ``get_x0_from_noise``); other times are unchanged. The exported ``LCMScheduler`` is then
  called with ``timesteps = [τ_n, τ_1, …]`` (:meth:`SDXLAdapter.pipeline_call_kwargs`), which is how
  DMD2's and the paper's SDXL checkpoints are sampled (``timesteps=[399]``).
- Conditions: ``encode_prompt`` (two CLIPs, penultimate hidden states concatenated, pooled output
  of the second) plus the micro-conditioning ``add_time_ids = (orig_h, orig_w, crop_top,
  crop_left, target_h, target_w)`` built as ``_get_add_time_ids`` builds them for the adapter's
  resolution. The null condition follows the pipeline's CFG convention: zeros (token and pooled
  embeddings) when ``force_zeros_for_empty_prompt`` is set (SDXL's default), else the encoded ``""``.
- Export: an ``LCMScheduler`` with the pipeline's betas samples the student in plain diffusers. Its
  step, ``x̂0 = (x − σ_τ·ε̂)/α_τ``, ``denoised = c_out·x̂0 + c_skip·x`` (``c_skip`` < 1e-7 with the
  default ``timestep_scaling`` 10), ``x ← α_prev·denoised + σ_prev·z``, is our few-step sampler on
  the grid ``1, t(τ_1), …, t(τ_{N−1}), 0`` (:meth:`SDXLAdapter.few_step_grid`); ``shift`` is ignored.
- Decoding: ``latents / scaling_factor`` (or ``latents·std / scaling_factor + mean`` when the VAE
  config has ``latents_mean``/``latents_std``) → ``vae.decode``; the VAE is upcast to float32 like
  the pipeline does when it is float16 with ``force_upcast``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from dmdr_fast.models.families import ModelFamily
from dmdr_fast.models.protocol import Condition
from dmdr_fast.models.random_parts import byte_level_clip_tokenizer, clip_text_model, tiny_vae
from dmdr_fast.models.t2i import TextToImageAdapter, check_time

if TYPE_CHECKING:
    from diffusers import ModelMixin

__all__ = [
    "FAMILY",
    "SDXL_LORA_TARGETS",
    "SDXLAdapter",
    "SDXLCondition",
    "expected_noise_timestep",
    "lcm_timesteps",
    "random_pipeline",
]

#: LoRA targets of the authors' SDXL scripts (their recipes: ``docs/method.md`` §11): attention,
#: transformer projections and feed-forward, ResNet convolutions and time projections,
#: down/upsampler convolutions.
SDXL_LORA_TARGETS = tuple(
    f"*{name}"
    for name in (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    )
)


def lcm_timesteps(scheduler: Any, num_steps: int, noise_timestep: int | None = None) -> list[int]:
    """The integer timesteps an ``LCMScheduler`` visits in ``num_steps`` steps, first one replaced.

    Args:
        scheduler: An ``LCMScheduler`` (its ``set_timesteps`` is called: the state changes).
        num_steps: Number of sampling steps N.
        noise_timestep: The timestep of the first (pure-noise) step; ``None`` keeps LCM's own.

    Returns:
        N descending timesteps, e.g. ``[399]`` for DMD2's 1-step SDXL.

    Raises:
        ValueError: If ``noise_timestep`` does not lie above the second timestep (LCM needs a
            strictly descending schedule).
    """
    scheduler.set_timesteps(num_steps)
    taus = [int(v) for v in scheduler.timesteps.tolist()]
    if noise_timestep is None:
        return taus
    if len(taus) > 1 and int(noise_timestep) <= taus[1]:
        raise ValueError(
            f"noise timestep {noise_timestep} must be above the second of the {num_steps}-step LCM "
            f"timesteps {taus}: LCM needs a strictly descending schedule"
        )
    return [int(noise_timestep), *taus[1:]]


class _CustomFirstTimestepFilter(logging.Filter):
    """Drops LCMScheduler's warning that a custom schedule does not start at timestep 999."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The first timestep on the custom timestep schedule")


@contextlib.contextmanager
def expected_noise_timestep() -> Iterator[None]:
    """Silence diffusers' "first timestep is not 999 … unexpected results" warning in the block.

    It fires on every pipeline call of a student with a noise timestep (DMD2's ``timesteps=[399]``),
    for which starting below 999 is the point; other warnings are kept.
    """
    logger = logging.getLogger("diffusers.schedulers.scheduling_lcm")
    quiet = _CustomFirstTimestepFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@dataclasses.dataclass
class SDXLCondition:
    """A batch of SDXL text conditions.

    Attributes:
        prompt_embeds: ``(B, 77, cross_attention_dim)`` penultimate CLIP hidden states (2048 for SDXL).
        pooled_prompt_embeds: ``(B, P)`` pooled projection of the second CLIP (1280 for SDXL).
        add_time_ids: ``(B, 6)`` ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    add_time_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])


class SDXLAdapter(TextToImageAdapter):
    """A diffusers SDXL ``UNet2DConditionModel`` (+ VAE, text encoders) behind ``FlowModelAdapter``.

    Args:
        unet: The SDXL UNet (``addition_embed_type="text_time"``, no ``time_cond_proj_dim``).
        vae: The ``AutoencoderKL``; ``None`` disables :meth:`decode`.
        pipeline: A ``StableDiffusionXLPipeline`` (text encoding, null condition, export).
        scheduler: Source of ``alphas_cumprod`` and ``prediction_type``; default the pipeline's.
        resolution: Image side (or ``(height, width)``) in pixels; sets :attr:`sample_shape` and the
            default ``add_time_ids``. Default: ``unet.config.sample_size · vae_scale_factor``.
        original_size: ``(h, w)`` of the micro-conditioning; default ``resolution``.
        crops_coords_top_left: Crop micro-conditioning, default ``(0, 0)``.
        target_size: ``(h, w)`` of the micro-conditioning; default ``resolution``.
        clamp: Clamp decoded images to ``[0, 1]``.
    """

    family = "sdxl"
    condition_class = SDXLCondition
    network_attr = "unet"
    pipeline_class = StableDiffusionXLPipeline
    default_pipeline_kwargs = {"add_watermarker": False}  # noqa: RUF012 (read-only)
    reads_flow_scheduler = False
    lora_prefix = "unet"
    default_lora_targets = SDXL_LORA_TARGETS

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        vae: AutoencoderKL | None = None,
        pipeline: StableDiffusionXLPipeline | None = None,
        scheduler: Any | None = None,
        resolution: int | tuple[int, int] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        clamp: bool = True,
    ) -> None:
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"SDXLAdapter needs a UNet2DConditionModel, got {type(unet).__name__}")
        if unet.config.addition_embed_type != "text_time" or unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "SDXLAdapter needs an SDXL UNet: addition_embed_type='text_time', no time_cond_proj_dim"
            )
        super().__init__(vae=vae, pipeline=pipeline, clamp=clamp)
        self.unet = unet
        scheduler = scheduler if scheduler is not None else getattr(pipeline, "scheduler", None)
        if scheduler is None:
            raise ValueError("SDXLAdapter needs a scheduler (or a pipeline with one) for its noise schedule")
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)"
            )
        if scheduler.config.get("timestep_type", "discrete") != "discrete":
            raise ValueError("only discrete-timestep schedulers are supported (timestep_type='discrete')")
        acp = getattr(scheduler, "alphas_cumprod", None)
        if acp is None:
            acp = torch.cumprod(1.0 - torch.as_tensor(scheduler.betas, dtype=torch.float32), 0)
        acp = torch.as_tensor(acp, dtype=torch.float32).cpu()
        self.scheduler_config = dict(scheduler.config)
        self.alphas_cumprod = acp  # (T,) float32, like every diffusers VP scheduler
        lam = torch.log(acp.double()) - torch.log1p(-acp.double())  # log-SNR, decreasing in τ
        if not bool(torch.isfinite(lam).all()) or not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError(
                "the noise schedule needs a finite, strictly decreasing log-SNR (no zero terminal SNR)"
            )
        self._log_snr = lam  # float64 on CPU; not a buffer so that .to(dtype) leaves it alone
        self._log_snr_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tau_max = int(acp.numel() - 1)
        self.t_max = float(torch.sigmoid(-lam[-1] / 2))  # flow time of τ_max: σ / (α + σ)
        self.noise_timestep: int | None = None  # τ_n of t = 1 samples (set_noise_timestep); None = τ_max
        self.in_channels = int(unet.config.in_channels)
        self._set_resolution(
            resolution, default_latent_side=int(unet.config.sample_size), multiple=1, why="VAE factor"
        )
        self.original_size = tuple(original_size or self.resolution)
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size or self.resolution)

    # ---- construction -----------------------------------------------------------------------------

    def set_noise_timestep(self, timestep: int | None) -> None:
        """Call the UNet at ``timestep`` (not ``τ_max``) on pure noise, i.e. for samples at ``t = 1``.

        For a *student* whose first step was trained that way (DMD2's 1-step SDXL: 399); a teacher
        keeps ``None``. Export and :meth:`pipeline_call_kwargs` then pass ``timesteps=[τ_n, …]``.

        Args:
            timestep: An integer in ``[1, τ_max]``, or ``None`` for ``τ_max`` (the default).

        Raises:
            ValueError: If ``timestep`` is not such an integer.
        """
        valid = isinstance(timestep, int) and not isinstance(timestep, bool) and 1 <= timestep <= self.tau_max
        if timestep is not None and not valid:
            raise ValueError(f"noise timestep must be an integer in [1, {self.tau_max}], got {timestep!r}")
        self.noise_timestep = timestep
        if timestep is not None:  # Python floats: torch.where puts them on the device, no host copy
            lam = self._log_snr[timestep]
            self._noise_vp = (
                float(timestep),
                float(torch.sigmoid(lam).sqrt()),
                float(torch.sigmoid(-lam).sqrt()),
            )

    # ---- FlowModelAdapter -------------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C_latent, H / vae_scale_factor, W / vae_scale_factor)``, e.g. ``(4, 128, 128)`` at 1024²."""
        height, width = self.resolution
        return (self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def vp_parameters(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(τ, α_τ, σ_τ)`` of flow times ``t``: same log-SNR, τ clamped to ``[0, τ_max]``.

        Args:
            t: Flow times ``(B,)`` in ``[0, 1]``.

        Returns:
            Three float64 ``(B,)`` tensors: the continuous UNet timestep and the VP coefficients.
        """
        tables = self._log_snr_cache.get(t.device)
        if tables is None:  # (λ_τ, −λ_τ) on t's device: no host sync in the lookup below
            table = self._log_snr.to(t.device)
            tables = self._log_snr_cache.setdefault(t.device, (table, -table))
        table, negated = tables
        t = t.double()
        lam = 2.0 * (torch.log1p(-t) - torch.log(t))  # ±inf at t = 0 / 1, clamped next
        lam = torch.clamp(lam, min=table[-1], max=table[0])
        i0 = (torch.searchsorted(negated, -lam) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[i0], table[i0 + 1]
        tau = i0.double() + (lo - lam) / (lo - hi)
        return tau, torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` at ``x_t`` (flow ↔ VP conversion in the module docstring).

        Args:
            x_t: Noisy latents ``(B, C, H, W)``.
            t: Flow times in ``[0, 1]``, shape ``(B,)`` (a float or 0-dim tensor is broadcast).
            cond: An :class:`SDXLCondition` of batch size B.

        Returns:
            Velocity ``(B, C, H, W)`` in the dtype of ``x_t``.
        """
        batch = self._check_sample(x_t)
        t = check_time(t, batch, x_t.device)
        cond = self._check_condition(cond, batch)
        tau, alpha, sigma = self.vp_parameters(t)
        if self.noise_timestep is not None:  # pure-noise samples at the student's own timestep τ_n
            first = t >= 1.0
            tau_n, alpha_n, sigma_n = self._noise_vp
            tau = torch.where(first, tau_n, tau)
            alpha = torch.where(first, alpha_n, alpha)
            sigma = torch.where(first, sigma_n, sigma)
        shape = (batch, 1, 1, 1)
        alpha, sigma = alpha.float().view(shape), sigma.float().view(shape)
        t32 = t.float().view(shape)
        clamped = t.double().view(shape) > self.t_max
        x = x_t.float()
        x_vp = x * torch.rsqrt((1.0 - t32) ** 2 + t32**2)
        dtype = self._dtype()
        out = self.unet(
            x_vp.to(dtype),
            tau.float(),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            added_cond_kwargs={
                "text_embeds": cond.pooled_prompt_embeds.to(dtype),
                "time_ids": cond.add_time_ids.to(dtype),
            },
            return_dict=False,
        )[0].float()
        eps = out if self.prediction_type == "epsilon" else alpha * out + sigma * x_vp
        t_u = torch.where(clamped, torch.zeros_like(t32), t32)  # safe values in the unused branch
        x0_u = (x - t_u * eps) / (1.0 - t_u)
        x0_c = (x_vp - sigma * eps) / alpha
        v = torch.where(clamped, (x - x0_c) / torch.where(clamped, t32, torch.ones_like(t32)), eps - x0_u)
        return v.to(x_t.dtype)

    @torch.no_grad()
    def encode_condition(self, raw: str | Sequence[str]) -> SDXLCondition:
        """Prompts → :class:`SDXLCondition` via ``encode_prompt`` (no CFG pairing) and ``add_time_ids``.

        Raises:
            ValueError: If there is no pipeline, the encoders were dropped, or ``raw`` is not text.
        """
        prompts = [raw] if isinstance(raw, str) else list(raw)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("SDXL conditions are prompts: a string or a sequence of strings")
        pipe = self._require_encoders()
        device = self._device()
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = pipe._get_add_time_ids(
            self.original_size,
            self.crops_coords_top_left,
            self.target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=int(pooled.shape[-1]),
        )
        time_ids = time_ids.to(device).repeat(len(prompts), 1)
        return SDXLCondition(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, add_time_ids=time_ids)

    def null_condition(self, batch_size: int) -> SDXLCondition:
        """The pipeline's unconditional branch: zero embeddings if ``force_zeros_for_empty_prompt``.

        Otherwise the encoded ``""``; ``add_time_ids`` are the conditional ones (as in the pipeline).
        Cached like the base class (and replaceable with :meth:`set_null_condition`).
        """
        if self._null is None:
            null = self.encode_condition([""])
            if self._force_zeros():
                null = dataclasses.replace(
                    null,
                    prompt_embeds=torch.zeros_like(null.prompt_embeds),
                    pooled_prompt_embeds=torch.zeros_like(null.pooled_prompt_embeds),
                )
            self._null = null
        return super().null_condition(batch_size)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents → RGB in ``[0, 1]`` (see :meth:`TextToImageAdapter.decode`).

        The SDXL VAE overflows in float16: like the pipeline (``force_upcast``) it is upcast to float32,
        here once and for good (the pipeline casts it back after each call).
        """
        vae = self.tiny_vae if self.tiny_vae is not None else self.vae
        if vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        return super().decode(x)

    def unscale_latents(self, x: torch.Tensor, vae: ModelMixin) -> torch.Tensor:
        """``x / scaling_factor``, or ``x·std / scaling_factor + mean`` with latents statistics (pipeline)."""
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return super().unscale_latents(x, vae)
        mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x * std / config.scaling_factor + mean

    # ---- SDXL-specific: fingerprint and export ---------------------------------------------------

    def condition_settings(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "crops_coords_top_left": list(self.crops_coords_top_left),
            "target_size": list(self.target_size),
            "force_zeros_for_empty_prompt": self._force_zeros(),
        }

    def export_scheduler(self, num_steps: int, shift: float) -> LCMScheduler:
        """``LCMScheduler`` with the pipeline scheduler's betas and prediction type (``shift`` ignored).

        Clipping/thresholding are off and ``timestep_spacing``/``timestep_scaling`` are LCM's defaults,
        so its step is our few-step sampler up to ``c_skip`` < 1e-7 (module docstring).
        """
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        config = {k: self.scheduler_config[k] for k in keys if k in self.scheduler_config}
        config.update(
            prediction_type=self.prediction_type,
            rescale_betas_zero_snr=bool(self.scheduler_config.get("rescale_betas_zero_snr", False)),
            clip_sample=False,
            thresholding=False,
        )
        return LCMScheduler.from_config(config)

    def few_step_grid(self, num_steps: int, shift: float) -> torch.Tensor:
        """``(N + 1,)`` flow times the exported ``LCMScheduler`` visits: ``1, t(τ_1), …, t(τ_{N−1}), 0``.

        LCM starts from pure noise at ``τ_0 = τ_max`` (our clamped ``t = 1``; a student's noise
        timestep changes the call at that point, not the grid); later points are
        ``t(τ_k) = σ_τ / (α_τ + σ_τ)``. ``shift`` is ignored for SDXL.
        """
        scheduler = self.export_scheduler(num_steps, shift)
        taus = torch.tensor(lcm_timesteps(scheduler, num_steps, self.noise_timestep))
        if taus.numel() != num_steps or int(scheduler.timesteps[0]) != self.tau_max:
            raise ValueError(f"the exported scheduler gives unusable timesteps {taus.tolist()}")
        inner = torch.sigmoid(-self._log_snr[taus[1:]] / 2).float()
        grid = torch.cat([torch.ones(1), inner, torch.zeros(1)])
        if not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError(f"the exported scheduler gives an unusable grid {grid.tolist()}")
        return grid

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """``num_inference_steps`` and ``guidance_scale=0`` (CFG off: the pipeline needs > 1 for CFG).

        With a noise timestep the steps are given as ``timesteps`` (e.g. ``[399]``), which the
        pipeline passes to ``LCMScheduler.set_timesteps``.
        """
        if self.noise_timestep is None:
            return {"num_inference_steps": int(num_steps), "guidance_scale": 0.0}
        taus = lcm_timesteps(self.export_scheduler(num_steps, 1.0), num_steps, self.noise_timestep)
        return {"timesteps": taus, "guidance_scale": 0.0}

    # ---- checks -----------------------------------------------------------------------------------

    def _force_zeros(self) -> bool:
        config = getattr(self._pipeline, "config", None) or {}
        return bool(config.get("force_zeros_for_empty_prompt", False))

    def _check_sample(self, x_t: torch.Tensor) -> int:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be (B, {self.in_channels}, H, W) latents, got {shape}")
        return int(x_t.shape[0])

    @staticmethod
    def _check_condition(cond: Condition, batch: int) -> SDXLCondition:
        if not isinstance(cond, SDXLCondition):
            raise ValueError(
                f"cond must be an SDXLCondition (use encode_condition), got {type(cond).__name__}"
            )
        shapes = (cond.prompt_embeds.shape, cond.pooled_prompt_embeds.shape, cond.add_time_ids.shape)
        if len(shapes[0]) != 3 or len(shapes[1]) != 2 or tuple(shapes[2][1:]) != (6,):
            raise ValueError(
                f"SDXLCondition needs (B, L, C), (B, P), (B, 6) tensors, got {[tuple(s) for s in shapes]}"
            )
        if any(s[0] != batch for s in shapes):
            raise ValueError(f"condition batch sizes {[s[0] for s in shapes]} do not match x_t batch {batch}")
        return cond


# --------------------------------------------------------------------------------------------------
# Random-weight pipelines and the family's registry entry.
# --------------------------------------------------------------------------------------------------


def random_pipeline(size: str, folder: Path, seed: int = 0) -> Any:
    """A random-weight pipeline of this family (``size`` in ``FAMILY.random_sizes``; scratch files
    such as the tokenizer go under ``folder``)."""
    import transformers
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = byte_level_clip_tokenizer(folder / "_tokenizer", 8)

    def clip(cls: type, s: int) -> Any:
        return clip_text_model(tokenizer, hidden=8, projection=4, tokens=8, seed=s, cls=cls)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
        cross_attention_dim=16,  # = 8 + 8 (two CLIP widths)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=28,  # 6 time ids × 4 + pooled projection 4
    ).eval()
    scheduler = EulerDiscreteScheduler(  # SDXL's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(seed + 1, 0.13025, None),
        text_encoder=clip(transformers.CLIPTextModel, seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=clip(transformers.CLIPTextModelWithProjection, seed + 3),
        tokenizer_2=tokenizer,
        add_watermarker=False,
    )


FAMILY = ModelFamily(
    name="sdxl",
    adapter=SDXLAdapter,
    pipeline_class="StableDiffusionXLPipeline",
    default_preset="sdxl-1step",
    sampling_steps=50,
    sampling_guidance=5.0,
    random_sizes=("tiny",),
    random_pipeline=random_pipeline,
)
