"""Adapter for diffusers' SD3 / SD3.5 ``SD3Transformer2DModel`` (flow matching, joint attention).

What diffusers' SD3 does and how the adapter maps it (diffusers 0.42):

- Noise convention: ``FlowMatchEulerDiscreteScheduler`` forms ``x_σ = σ·ε + (1 − σ)·x0``
  (``scale_noise``) and steps ``x ← x + (σ_next − σ)·v`` with the raw transformer output ``v``
  (``step``, deterministic branch). So the output *is* ``v = ε − x0`` and ``σ`` *is* our ``t``
  (``docs/method.md`` §1): no sign flip, no rescaling of the output.
- Time: the pipeline calls the transformer with ``timestep = σ · num_train_timesteps`` (1000), a
  float; the adapter passes ``t · num_train_timesteps`` the same way.
- Shift: the scheduler's ``shift`` (3.0 for SD3/SD3.5) only warps which σ values a sampler
  visits, ``σ = shift·s / (1 + (shift − 1)·s)``; it does not enter the network call. The adapter
  exposes it as :attr:`SD3Adapter.shift` and :meth:`SD3Adapter.shift_time` for samplers/trainers.
- Text: ``encode_prompt`` concatenates the two CLIP penultimate hidden states along channels,
  zero-pads them to ``joint_attention_dim`` and appends the T5 tokens (zeros of length
  ``max_sequence_length`` when ``text_encoder_3`` is ``None``) along the sequence; the pooled
  projection is the two CLIP pooled outputs concatenated. The adapter stores both in an
  :class:`SD3Condition`; the null condition is the empty prompt ``""`` (what the pipeline uses as
  the default negative prompt for classifier-free guidance).
- Decoding: ``latents / scaling_factor + shift_factor`` → ``vae.decode`` → ``[-1, 1]`` images,
  mapped to ``[0, 1]`` here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

from dmdr_fast.models.families import ModelFamily
from dmdr_fast.models.protocol import Condition
from dmdr_fast.models.random_parts import (
    byte_level_clip_tokenizer,
    char_t5_tokenizer,
    clip_text_model,
    t5_encoder,
)
from dmdr_fast.models.t2i import TextToImageAdapter, check_time

__all__ = ["FAMILY", "SD3_LORA_TARGETS", "SD3Adapter", "SD3Condition", "random_pipeline"]

#: LoRA targets of the authors' SD3/SD3.5 scripts (student and critic): the joint attention's
#: image and text projections (``docs/method.md`` §11).
SD3_LORA_TARGETS = tuple(
    f"*attn.{name}"
    for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
)


@dataclasses.dataclass
class SD3Condition:
    """A batch of SD3 text conditions.

    Attributes:
        prompt_embeds: ``(B, L, joint_attention_dim)`` token embeddings (CLIP ⊕ T5 tokens).
        pooled_projections: ``(B, pooled_projection_dim)`` pooled CLIP embeddings.
    """

    prompt_embeds: torch.Tensor
    pooled_projections: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])


class SD3Adapter(TextToImageAdapter):
    """A diffusers ``SD3Transformer2DModel`` (+ VAE and text encoders) behind ``FlowModelAdapter``.

    Conditions are :class:`SD3Condition` batches. The adapter is an ``nn.Module`` holding the
    transformer as ``.transformer`` and the frozen VAE and text encoders as submodules (so
    ``.to`` moves them and :func:`~dmdr_fast.models.make_student` shares them instead of copying);
    the pipeline object itself is kept only to call its ``encode_prompt``. ``forward`` is the
    velocity.

    Args:
        transformer: The SD3/SD3.5 transformer (predicts ``v = ε − x0``, see module docstring).
        vae: The ``AutoencoderKL``; ``None`` disables :meth:`decode`.
        pipeline: A ``StableDiffusion3Pipeline`` whose ``encode_prompt`` (text encoders and
            tokenizers) turns prompts into conditions; ``None`` disables text encoding.
        resolution: Image side (or ``(height, width)``) in pixels; sets :attr:`sample_shape`.
            Default: ``transformer.config.sample_size · vae_scale_factor``.
        num_train_timesteps: The network's timestep is ``t · num_train_timesteps``.
        shift: The scheduler's time shift (informational, see :meth:`shift_time`).
        max_sequence_length: T5 token count passed to ``encode_prompt`` (its default is 256).
        clamp: Clamp decoded images to ``[0, 1]``.
    """

    family = "sd3"
    condition_class = SD3Condition
    network_attr = "transformer"
    pipeline_class = StableDiffusion3Pipeline
    default_lora_targets = SD3_LORA_TARGETS

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        *,
        vae: AutoencoderKL | None = None,
        pipeline: StableDiffusion3Pipeline | None = None,
        resolution: int | tuple[int, int] | None = None,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        max_sequence_length: int = 256,
        clamp: bool = True,
    ) -> None:
        if not isinstance(transformer, SD3Transformer2DModel):
            raise TypeError(f"SD3Adapter needs an SD3Transformer2DModel, got {type(transformer).__name__}")
        super().__init__(vae=vae, pipeline=pipeline, clamp=clamp)
        self.transformer = transformer
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.max_sequence_length = int(max_sequence_length)
        config = transformer.config
        self.in_channels = int(config.in_channels)
        self.patch_size = int(config.patch_size)
        self._set_resolution(
            resolution,
            default_latent_side=int(config.sample_size),
            multiple=self.patch_size,
            why="VAE factor × patch",
        )

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        load_t5: bool = True,
        pipeline_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SD3Adapter:
        """Load a local SD3 folder (see :meth:`TextToImageAdapter.from_pretrained`).

        Args:
            path: The pipeline folder (``model_index.json`` and component subfolders).
            load_t5: ``False`` loads without ``text_encoder_3`` / ``tokenizer_3`` (T5 tokens become
                zeros, as in the pipeline), e.g. for a folder saved without them.
            pipeline_kwargs: Extra ``from_pretrained`` arguments (e.g. ``text_encoder_3=None``).
            **kwargs: ``device``, ``torch_dtype`` and :class:`SD3Adapter` arguments.
        """
        extra = dict(pipeline_kwargs or {})
        if not load_t5:
            extra.setdefault("text_encoder_3", None)
            extra.setdefault("tokenizer_3", None)
        return super().from_pretrained(path, pipeline_kwargs=extra, **kwargs)

    # ---- FlowModelAdapter -------------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C_latent, H / vae_scale_factor, W / vae_scale_factor)``."""
        height, width = self.resolution
        return (self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` at ``x_t``.

        Args:
            x_t: Noisy latents ``(B, C, H, W)``, ``H``, ``W`` divisible by the patch size.
            t: Times in ``[0, 1]`` (= the scheduler's σ), shape ``(B,)`` (a float or 0-dim tensor
                is broadcast).
            cond: An :class:`SD3Condition` of batch size B.

        Returns:
            Velocity ``(B, C, H, W)`` in the dtype of ``x_t``.
        """
        batch = self._check_sample(x_t)
        t = check_time(t, batch, x_t.device)
        cond = self._check_condition(cond, batch)
        dtype = self.transformer.pos_embed.proj.weight.dtype
        timestep = t.float() * self.num_train_timesteps
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled_projections.to(dtype),
            timestep=timestep,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    @torch.no_grad()
    def encode_condition(self, raw: str | Sequence[str]) -> SD3Condition:
        """Prompts → :class:`SD3Condition` via the pipeline's ``encode_prompt`` (no CFG pairing).

        Raises:
            ValueError: If the adapter has no pipeline or ``raw`` is not a string / list of strings.
        """
        prompts = [raw] if isinstance(raw, str) else list(raw)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("SD3 conditions are prompts: a string or a sequence of strings")
        pipe = self._require_encoders()
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self._device(),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return SD3Condition(prompt_embeds=prompt_embeds, pooled_projections=pooled)

    # ---- SD3-specific helpers ---------------------------------------------------------------------

    def condition_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """No CFG (``guidance_scale`` 1) and the training T5 length (its padding is not masked)."""
        return {**super().pipeline_call_kwargs(num_steps), "max_sequence_length": self.max_sequence_length}

    def pipeline_sigmas(self, num_steps: int) -> list[float] | None:
        """``StableDiffusion3Pipeline`` passes no sigmas: the scheduler's own spacing is used."""
        return None

    @staticmethod
    def _check_condition(cond: Condition, batch: int) -> SD3Condition:
        if not isinstance(cond, SD3Condition):
            raise ValueError(
                f"cond must be an SD3Condition (use encode_condition), got {type(cond).__name__}"
            )
        if cond.prompt_embeds.dim() != 3 or cond.pooled_projections.dim() != 2:
            raise ValueError(
                "SD3Condition needs prompt_embeds (B, L, C) and pooled_projections (B, P), got "
                f"{tuple(cond.prompt_embeds.shape)} and {tuple(cond.pooled_projections.shape)}"
            )
        if cond.prompt_embeds.shape[0] != batch or cond.pooled_projections.shape[0] != batch:
            raise ValueError(
                f"condition batch {cond.prompt_embeds.shape[0]}/{cond.pooled_projections.shape[0]} "
                f"does not match x_t batch {batch}"
            )
        return cond


# --------------------------------------------------------------------------------------------------
# Random-weight pipelines and the family's registry entry.
# --------------------------------------------------------------------------------------------------


def random_pipeline(size: str, folder: Path, seed: int = 0, *, t5: bool = True) -> Any:
    """A random-weight pipeline of this family (``size`` in ``FAMILY.random_sizes``; scratch files
    such as the tokenizer go under ``folder``).

    Args:
        t5: ``False`` leaves out the T5 encoder (``text_encoder_3 = tokenizer_3 = None``, as users
            load SD3 to save its memory): ``encode_prompt`` then appends ``max_sequence_length``
            zero tokens. Every other component is the same as with T5.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tiny = size == "tiny"
    tokens = 8 if tiny else 77
    tokenizer = byte_level_clip_tokenizer(folder / "_tokenizer", tokens)
    clip_hidden, clip_proj = (8, 4) if tiny else (64, 1024)
    torch.manual_seed(seed)
    if tiny:
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=2 * clip_hidden,  # = the T5 width (CLIP states are padded to it)
            caption_projection_dim=16,
            pooled_projection_dim=2 * clip_proj,
            out_channels=4,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae_kwargs: dict[str, Any] = dict(
            block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4
        )
    else:  # stabilityai/stable-diffusion-3.5-medium transformer/config.json, vae/config.json
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
        vae_kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)
    blocks = len(vae_kwargs["block_out_channels"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        sample_size=16 if tiny else 1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        **vae_kwargs,
    )
    # A one-layer T5 at the transformer's joint width (tiny: 16, SD3.5-M: 4096; ~1M parameters
    # either way) so that the folder is a complete pipeline plain diffusers loads as is.
    t5_tokenizer = char_t5_tokenizer() if t5 else None
    t5_model = t5_encoder(t5_tokenizer, transformer.config.joint_attention_dim, seed + 4) if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=clip_text_model(
            tokenizer, hidden=clip_hidden, projection=clip_proj, tokens=tokens, seed=seed + 2
        ),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_model(
            tokenizer, hidden=clip_hidden, projection=clip_proj, tokens=tokens, seed=seed + 3
        ),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_model,
        tokenizer_3=t5_tokenizer,
    )


FAMILY = ModelFamily(
    name="sd3",
    adapter=SD3Adapter,
    pipeline_class="StableDiffusion3Pipeline",
    default_preset="sd3-medium-4step",
    sampling_steps=28,
    sampling_guidance=7.0,
    random_sizes=("tiny", "sd35-medium"),
    random_pipeline=random_pipeline,
)
