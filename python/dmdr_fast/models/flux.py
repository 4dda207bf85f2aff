"""Adapter for diffusers' Flux ``FluxTransformer2DModel`` (flow matching, packed 2×2 latent patches).

What diffusers' Flux does and how the adapter maps it (diffusers 0.42):

- Noise convention: as for SD3, ``FlowMatchEulerDiscreteScheduler`` forms ``x_σ = σ·ε + (1 − σ)·x0``
  and steps ``x ← x + (σ_next − σ)·v`` with the raw transformer output ``v``; so the output *is*
  ``v = ε − x0`` and ``σ`` *is* our ``t`` (``docs/method.md`` §1): no sign flip, no rescaling.
- Time: ``FluxPipeline`` calls the transformer with ``timestep = (σ·1000) / 1000 = σ`` and the
  transformer multiplies by 1000 itself; the adapter passes ``t`` directly. The embedded guidance
  goes the same way (``guidance`` in guidance units, ×1000 inside the transformer).
- Latents: the VAE latents ``(B, C, H, W)`` (C = 16 for Flux) are packed into 2×2 patches,
  ``(B, H/2·W/2, 4C)`` (``FluxPipeline._pack_latents``), with RoPE position ids ``(H/2·W/2, 3)``
  ``(0, row, col)`` for the image tokens and zeros ``(L, 3)`` for the text tokens. The adapter
  works on the *unpacked* latents (:attr:`FluxAdapter.sample_shape`) and packs/unpacks around the
  transformer call, so the algorithm sees ordinary ``(B, C, H, W)`` samples.
- Shift: the scheduler's (dynamic, resolution-dependent) shift only warps the σ grid;
  :meth:`FluxAdapter.pipeline_shift` gives the static shift equivalent to the teacher pipeline's at
  the adapter's resolution. The pipeline passes ``sigmas = np.linspace(1, 1/N, N)`` (float64) to
  ``set_timesteps``; :meth:`FluxAdapter.pipeline_sigmas` does the same, bit for bit (a float32
  ``torch.linspace`` differs from it by one ulp for some N, e.g. 3 and 6).
- Text: ``encode_prompt`` gives the T5 token states ``(B, max_sequence_length, 4096)`` (padded to
  the fixed length, no attention mask) and the CLIP pooled output ``(B, 768)``; the null condition
  is the empty prompt ``""``.
- Decoding: ``latents / scaling_factor + shift_factor`` → ``vae.decode`` → ``[-1, 1]`` images,
  mapped to ``[0, 1]`` here (the base class).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from dmdr_fast.models.families import ModelFamily
from dmdr_fast.models.protocol import Condition
from dmdr_fast.models.random_parts import (
    byte_level_clip_tokenizer,
    char_t5_tokenizer,
    clip_text_model,
    t5_encoder,
    tiny_vae,
)
from dmdr_fast.models.t2i import TextToImageAdapter, check_time

__all__ = ["FAMILY", "FLUX_LORA_TARGETS", "FluxAdapter", "FluxCondition", "random_pipeline"]

#: LoRA targets (student and critic): the joint attention projections of the double-stream blocks
#: (image and text streams) and the attention projections of the single-stream blocks, whose output
#: projection is ``proj_out`` (it maps ``[attention ⊕ MLP]`` back to the model width; the
#: single-stream attention has no ``to_out``). The model's final ``proj_out`` is not targeted.
_DOUBLE_BLOCK_PROJECTIONS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
FLUX_LORA_TARGETS = (
    *(f"transformer_blocks.*.attn.{name}" for name in _DOUBLE_BLOCK_PROJECTIONS),
    *(f"single_transformer_blocks.*.attn.{name}" for name in ("to_q", "to_k", "to_v")),
    "single_transformer_blocks.*.proj_out",
)


@dataclasses.dataclass
class FluxCondition:
    """A batch of Flux text conditions.

    Attributes:
        prompt_embeds: ``(B, L, joint_attention_dim)`` T5 token states, ``L = max_sequence_length``.
        pooled_projections: ``(B, pooled_projection_dim)`` pooled CLIP embeddings.
        guidance: ``(B,)`` float32 embedded guidance values (used only by guidance-distilled
            transformers, ``config.guidance_embeds``; ignored otherwise).
    """

    prompt_embeds: torch.Tensor
    pooled_projections: torch.Tensor
    guidance: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])


class FluxAdapter(TextToImageAdapter):
    """A diffusers ``FluxTransformer2DModel`` (+ VAE and text encoders) behind ``FlowModelAdapter``.

    Conditions are :class:`FluxCondition` batches; samples are unpacked VAE latents and ``forward``
    (the velocity) packs them for the transformer. Like :class:`~dmdr_fast.models.sd3.SD3Adapter`,
    the adapter holds the transformer as ``.transformer`` and the frozen VAE and text encoders as
    submodules; the pipeline object is kept for ``encode_prompt`` and export.

    Guidance. A guidance-distilled teacher (Flux-dev, ``guidance_embeds=True``) takes the guidance
    strength as an *input* instead of being sampled with classifier-free guidance. With such a
    teacher DMDR's "real score" guidance is that embedded input, not CFG: set ``dmdr.guidance: 1.0``
    (no unconditional pass); the real score, the fake score and the student all receive
    :attr:`embedded_guidance` (it is stored in every :class:`FluxCondition`, the null condition
    included). The exported pipeline is then sampled with ``guidance_scale = embedded_guidance``,
    which in ``FluxPipeline`` *is* the embedded guidance, not CFG (:meth:`pipeline_call_kwargs`).
    For a teacher without guidance embeds (Flux-schnell-like or base models) the ``guidance``
    field is ignored and ordinary CFG through ``dmdr.guidance`` with the empty-prompt null
    condition applies.

    Args:
        transformer: The Flux transformer (predicts ``v = ε − x0``, see module docstring).
        vae: The ``AutoencoderKL``; ``None`` disables :meth:`decode`.
        pipeline: A ``FluxPipeline`` whose ``encode_prompt`` turns prompts into conditions; ``None``
            disables text encoding.
        resolution: Image side (or ``(height, width)``) in pixels, divisible by
            ``2·vae_scale_factor``; sets :attr:`sample_shape`. Default: the pipeline's default
            ``128 · vae_scale_factor`` (1024 for Flux).
        num_train_timesteps: The scheduler's ``num_train_timesteps`` (informational: Flux takes σ).
        shift: The scheduler's static shift (informational, see :meth:`pipeline_shift`).
        max_sequence_length: T5 token count passed to ``encode_prompt`` (512 for Flux-dev, 256 for
            Flux-schnell; at most 512).
        embedded_guidance: Guidance value put in every condition for guidance-distilled teachers
            (3.5 is Flux-dev's default ``guidance_scale``).
        clamp: Clamp decoded images to ``[0, 1]``.
    """

    family = "flux"
    condition_class = FluxCondition
    network_attr = "transformer"
    pipeline_class = FluxPipeline
    default_lora_targets = FLUX_LORA_TARGETS

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        vae: AutoencoderKL | None = None,
        pipeline: FluxPipeline | None = None,
        resolution: int | tuple[int, int] | None = None,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        max_sequence_length: int = 512,
        embedded_guidance: float = 3.5,
        clamp: bool = True,
    ) -> None:
        if not isinstance(transformer, FluxTransformer2DModel):
            raise TypeError(f"FluxAdapter needs a FluxTransformer2DModel, got {type(transformer).__name__}")
        config = transformer.config
        if config.in_channels % 4 or (config.out_channels or config.in_channels) != config.in_channels:
            raise ValueError(
                "FluxAdapter needs in_channels = out_channels = 4 × latent channels, got "
                f"{config.in_channels} and {config.out_channels}"
            )
        if not 0 < int(max_sequence_length) <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
        super().__init__(vae=vae, pipeline=pipeline, clamp=clamp)
        self.transformer = transformer
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.max_sequence_length = int(max_sequence_length)
        self.embedded_guidance = float(embedded_guidance)
        self.latent_channels = int(config.in_channels) // 4
        self._set_resolution(resolution, default_latent_side=128, multiple=2, why="2 × VAE factor")

    # ---- construction -----------------------------------------------------------------------------

    # ---- FlowModelAdapter -------------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Unpacked latents ``(C_latent, H / vae_scale_factor, W / vae_scale_factor)``."""
        height, width = self.resolution
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the embedded guidance (guidance-distilled, e.g. Flux-dev)."""
        return bool(self.transformer.config.guidance_embeds)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` at ``x_t``.

        Args:
            x_t: Noisy unpacked latents ``(B, C, H, W)``, ``H`` and ``W`` even.
            t: Times in ``[0, 1]`` (= the scheduler's σ), shape ``(B,)`` (a float or 0-dim tensor
                is broadcast).
            cond: A :class:`FluxCondition` of batch size B (its ``guidance`` is passed only when
                the transformer has guidance embeds).

        Returns:
            Velocity ``(B, C, H, W)`` in the dtype of ``x_t``.
        """
        batch = self._check_sample(x_t)
        t = check_time(t, batch, x_t.device)
        cond = self._check_condition(cond, batch)
        dtype = self.transformer.dtype
        _, _, height, width = x_t.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, dtype)
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype)
        out = self.transformer(
            hidden_states=self.pack_latents(x_t.to(dtype)),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled_projections.to(dtype),
            timestep=t.to(dtype),
            guidance=cond.guidance.float() if self.guidance_embeds else None,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        return self.unpack_latents(out, height, width).to(x_t.dtype)

    @torch.no_grad()
    def encode_condition(self, raw: str | Sequence[str]) -> FluxCondition:
        """Prompts → :class:`FluxCondition` via the pipeline's ``encode_prompt``.

        The ``guidance`` field is :attr:`embedded_guidance` for every sample.

        Raises:
            ValueError: If the adapter has no pipeline, its text encoders were dropped, or ``raw``
                is not a string / sequence of strings.
        """
        prompts = [raw] if isinstance(raw, str) else list(raw)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("Flux conditions are prompts: a string or a sequence of strings")
        pipe = self._require_encoders()
        device = self._device()
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        guidance = torch.full((len(prompts),), self.embedded_guidance, device=device, dtype=torch.float32)
        return FluxCondition(prompt_embeds=prompt_embeds, pooled_projections=pooled, guidance=guidance)

    # ---- Flux-specific helpers --------------------------------------------------------------------

    @staticmethod
    def pack_latents(x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, H/2·W/2, 4C)`` 2×2 patches, as ``FluxPipeline._pack_latents``."""
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`pack_latents`; ``height``, ``width`` are the latent (not pixel) sides."""
        b, _, channels = x.shape
        x = x.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, height, width)

    def condition_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "embedded_guidance": self.embedded_guidance}

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Arguments for ``pipe(prompt, **kwargs)`` that sample the exported student.

        ``guidance_scale`` is the embedded guidance (:attr:`embedded_guidance` for a
        guidance-distilled transformer, ignored otherwise); ``FluxPipeline`` does no CFG unless a
        negative prompt and ``true_cfg_scale > 1`` are given. ``max_sequence_length`` matches the
        conditions the student was trained on (the pipeline's default is 512).
        """
        return {
            "num_inference_steps": int(num_steps),
            "guidance_scale": self.embedded_guidance if self.guidance_embeds else 1.0,
            "max_sequence_length": self.max_sequence_length,
        }

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """``FluxPipeline``'s default ``np.linspace(1, 1/N, N)``, in float64 like the pipeline."""
        return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()

    def pipeline_shift(self) -> float:
        """The static shift equivalent to the pipeline scheduler's at :attr:`resolution`.

        With ``use_dynamic_shifting`` (Flux-dev/schnell configs) ``FluxPipeline`` computes
        ``mu`` from the packed sequence length and warps σ with ``exp(mu)`` (exponential
        ``time_shift_type``) or ``mu`` (linear), i.e. a static shift of that value; otherwise the
        scheduler's ``shift``.
        """
        scheduler = getattr(self._pipeline, "scheduler", None)
        config = dict(scheduler.config) if scheduler is not None else {}
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", self.shift))
        height, width = self.resolution
        seq_len = (height // (2 * self.vae_scale_factor)) * (width // (2 * self.vae_scale_factor))
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)

    def _check_sample(self, x_t: torch.Tensor) -> int:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a (B, C, H, W) tensor of unpacked latents, got {shape}")
        _, c, h, w = x_t.shape
        if c != self.latent_channels or h % 2 or w % 2:
            raise ValueError(
                f"x_t must have {self.latent_channels} channels and even sides (2×2 packing), got shape "
                f"{tuple(x_t.shape)} (sample shape {self.sample_shape})"
            )
        return int(x_t.shape[0])

    @staticmethod
    def _check_condition(cond: Condition, batch: int) -> FluxCondition:
        if not isinstance(cond, FluxCondition):
            raise ValueError(
                f"cond must be a FluxCondition (use encode_condition), got {type(cond).__name__}"
            )
        shapes = (cond.prompt_embeds.shape, cond.pooled_projections.shape, cond.guidance.shape)
        if cond.prompt_embeds.dim() != 3 or cond.pooled_projections.dim() != 2 or cond.guidance.dim() != 1:
            raise ValueError(
                "FluxCondition needs prompt_embeds (B, L, C), pooled_projections (B, P) and guidance (B,), "
                f"got {[tuple(s) for s in shapes]}"
            )
        if any(s[0] != batch for s in shapes):
            raise ValueError(f"condition batch {[s[0] for s in shapes]} does not match x_t batch {batch}")
        return cond


# --------------------------------------------------------------------------------------------------
# Random-weight pipelines and the family's registry entry.
# --------------------------------------------------------------------------------------------------


def random_pipeline(size: str, folder: Path, seed: int = 0, *, guidance_embeds: bool = True) -> Any:
    """A random-weight pipeline of this family (``size`` in ``FAMILY.random_sizes``; scratch files
    such as the tokenizer go under ``folder``).

    Args:
        guidance_embeds: ``True`` (default) gives a guidance-distilled transformer like Flux-dev's,
            which takes the embedded guidance as an input; ``False`` one without guidance embeds,
            like Flux-schnell's. Only the transformer differs: the text encoders, the VAE and the
            scheduler (Flux-dev's config, with dynamic shifting) are the same either way.
    """
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = byte_level_clip_tokenizer(folder / "_tokenizer", 8)
    clip = clip_text_model(
        tokenizer, hidden=8, projection=4, tokens=8, seed=seed + 2, cls=transformers.CLIPTextModel
    )
    t5_tokenizer = char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,  # True: like Flux-dev; False: like Flux-schnell
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Flux-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(t5_tokenizer, 12, seed + 3),
        tokenizer_2=t5_tokenizer,
    )


FAMILY = ModelFamily(
    name="flux",
    adapter=FluxAdapter,
    pipeline_class="FluxPipeline",
    default_preset="flux-4step",
    sampling_steps=28,
    sampling_guidance=3.5,
    random_sizes=("tiny",),
    random_pipeline=random_pipeline,
)
