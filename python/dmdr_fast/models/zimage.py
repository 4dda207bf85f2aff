"""Adapter for diffusers' Z-Image ``ZImageTransformer2DModel`` (single-stream DiT, flow matching).

What diffusers' ``ZImagePipeline`` does and how the adapter maps it (diffusers 0.42):

- Time: the scheduler (``FlowMatchEulerDiscreteScheduler``) works in ``σ`` with ``x_σ = σ·ε +
  (1 − σ)·x0``, so ``σ`` *is* our ``t``. The pipeline calls the transformer with the *inverted*
  time ``(1000 − σ·1000) / 1000 = 1 − σ`` (1 = clean image; the transformer multiplies by its
  ``t_scale`` itself). The adapter passes ``(T − t·T) / T`` with ``T = num_train_timesteps``
  (1000), which is bit-for-bit the pipeline's value.
- Sign: the pipeline negates the transformer output (``noise_pred = −out``) before
  ``scheduler.step`` (``x ← x + (σ_next − σ)·noise_pred``), so the transformer predicts
  ``x0 − ε`` and the adapter returns ``v = −out = ε − x0`` (``docs/method.md`` §1).
- Packing: latents go in as a *list* of ``(C, 1, H, W)`` tensors (a frame axis of 1) and come back
  as a list of the same shapes; the adapter unbinds a ``(B, C, H, W)`` batch and stacks the result.
- Text: ``encode_prompt`` wraps each prompt in the Qwen3 chat template
  (``add_generation_prompt=True, enable_thinking=True``), pads/truncates to
  ``max_sequence_length`` tokens, takes the second-to-last hidden state and keeps only the valid
  tokens: a list of ``(L_i, cap_feat_dim)`` tensors of *different* lengths. The transformer pads
  each caption to a multiple of 32 with a learned pad token that the caption still attends to, so
  the output depends on ``L_i`` and the embeddings must be passed unpadded. A
  :class:`ZImageCondition` stores them zero-padded to ``max_sequence_length`` plus their lengths
  (fixed per-sample shapes, so conditions concatenate, slice and cache generically) and
  :meth:`ZImageAdapter.forward` cuts them back to ``L_i``.
- Guidance: ``do_classifier_free_guidance`` is ``guidance_scale > 0`` and the pipeline combines
  ``pos + g·(pos − neg)``, i.e. the usual CFG scale is ``1 + g``; ``guidance_scale=0`` samples
  without CFG (what an exported student uses). The default negative prompt is ``""``, the
  adapter's null condition.
- Schedule: the pipeline passes ``sigmas = linspace(1, 1/N, N)`` and ``mu`` to ``set_timesteps``;
  ``mu`` only matters with ``use_dynamic_shifting`` (off for Z-Image, and in the exported
  scheduler), the static ``shift`` (3.0 for Z-Image-Turbo) warps the sigmas.
- Decoding: ``latents / scaling_factor + shift_factor`` → ``vae.decode`` (the Flux VAE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel

from dmdr_fast.models.families import ModelFamily
from dmdr_fast.models.protocol import Condition
from dmdr_fast.models.random_parts import qwen_chat_tokenizer, tiny_vae
from dmdr_fast.models.t2i import TextToImageAdapter, check_time

__all__ = [
    "FAMILY",
    "ZIMAGE_ATTENTION_TARGETS",
    "ZIMAGE_FEEDFORWARD_TARGETS",
    "ZIMAGE_LORA_TARGETS",
    "ZImageAdapter",
    "ZImageCondition",
    "random_pipeline",
]

#: LoRA targets: the attention q/k/v/out projections of the main layers, the noise (image) and the
#: context (caption) refiners (``layers.*``, ``noise_refiner.*``, ``context_refiner.*``).
ZIMAGE_ATTENTION_TARGETS: tuple[str, ...] = tuple(
    f"*.attention.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")
)
#: LoRA targets: the SwiGLU feed-forward linears of the same blocks (optional extra capacity).
ZIMAGE_FEEDFORWARD_TARGETS: tuple[str, ...] = tuple(f"*.feed_forward.{name}" for name in ("w1", "w2", "w3"))
#: Default LoRA targets of Z-Image students and critics: the attention projections. (All of them
#: see ``(B, L, dim)`` inputs, so per-sample LoRA scales work; the embedders see the tokens of all
#: samples concatenated and must not be LoRA targets with per-sample scales.)
ZIMAGE_LORA_TARGETS: tuple[str, ...] = ZIMAGE_ATTENTION_TARGETS

#: The patch sizes ``ZImagePipeline`` calls the transformer with (its forward's defaults).
_PATCH_SIZE, _F_PATCH_SIZE = 2, 1


@dataclasses.dataclass
class ZImageCondition:
    """A batch of Z-Image text conditions (Qwen3 hidden states of variable length, padded).

    Attributes:
        prompt_embeds: ``(B, L, cap_feat_dim)`` token embeddings, zero-padded after the valid ones
            to ``L`` (the adapter's ``max_sequence_length``).
        lengths: ``(B,)`` int64 numbers of valid tokens (``1 ≤ lengths[i] ≤ L``).
    """

    prompt_embeds: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def unpad(self) -> list[torch.Tensor]:
        """The list of ``(lengths[i], cap_feat_dim)`` views the transformer takes (one host sync)."""
        return [self.prompt_embeds[i, :n] for i, n in enumerate(self.lengths.tolist())]

    @classmethod
    def from_list(cls, embeds: Sequence[torch.Tensor], max_length: int) -> ZImageCondition:
        """Pad ``encode_prompt``'s list of ``(L_i, D)`` embeddings to ``(B, max_length, D)``.

        Raises:
            ValueError: If the list is empty, a tensor is not 2-D, or ``L_i`` is 0 or > ``max_length``.
        """
        if not embeds:
            raise ValueError("ZImageCondition.from_list needs at least one embedding, got none")
        lengths = [int(e.shape[0]) for e in embeds]
        if any(e.dim() != 2 for e in embeds) or not all(1 <= n <= max_length for n in lengths):
            shapes = [tuple(e.shape) for e in embeds]
            raise ValueError(f"expected (L_i, D) embeddings with 1 ≤ L_i ≤ {max_length}, got {shapes}")
        first = embeds[0]
        padded = first.new_zeros(len(embeds), max_length, first.shape[-1])
        for i, e in enumerate(embeds):
            padded[i, : lengths[i]] = e
        return cls(
            prompt_embeds=padded, lengths=torch.tensor(lengths, dtype=torch.int64, device=first.device)
        )


class ZImageAdapter(TextToImageAdapter):
    """A diffusers ``ZImageTransformer2DModel`` (+ VAE and Qwen3 text encoder) behind ``FlowModelAdapter``.

    Conditions are :class:`ZImageCondition` batches. The adapter is an ``nn.Module`` holding the
    transformer as ``.transformer`` and the frozen VAE and text encoder as submodules; the pipeline
    object is kept to call its ``encode_prompt`` and for export. ``forward`` is the velocity.

    Args:
        transformer: The Z-Image transformer (predicts ``x0 − ε`` at time ``1 − σ``, see the module
            docstring; the adapter converts both).
        vae: The ``AutoencoderKL``; ``None`` disables :meth:`decode`.
        pipeline: A ``ZImagePipeline`` whose ``encode_prompt`` (text encoder and tokenizer) turns
            prompts into conditions; ``None`` disables text encoding.
        resolution: Image side (or ``(height, width)``) in pixels; sets :attr:`sample_shape`.
            Default 1024 (the pipeline's default).
        num_train_timesteps: The scheduler's ``num_train_timesteps`` (the pipeline's 1000).
        shift: The scheduler's static time shift (informational, see :meth:`shift_time`).
        max_sequence_length: Token count passed to ``encode_prompt`` (the pipeline's default is 512)
            and the padded length ``L`` of the conditions.
        clamp: Clamp decoded images to ``[0, 1]``.
    """

    family = "zimage"
    condition_class = ZImageCondition
    network_attr = "transformer"
    pipeline_class = ZImagePipeline
    default_lora_targets = ZIMAGE_LORA_TARGETS

    def __init__(
        self,
        transformer: ZImageTransformer2DModel,
        *,
        vae: AutoencoderKL | None = None,
        pipeline: ZImagePipeline | None = None,
        resolution: int | tuple[int, int] = 1024,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        max_sequence_length: int = 512,
        clamp: bool = True,
    ) -> None:
        if not isinstance(transformer, ZImageTransformer2DModel):
            raise TypeError(
                f"ZImageAdapter needs a ZImageTransformer2DModel, got {type(transformer).__name__}"
            )
        config = transformer.config
        if _PATCH_SIZE not in config.all_patch_size or _F_PATCH_SIZE not in config.all_f_patch_size:
            raise ValueError(
                f"ZImagePipeline calls the transformer with patch size {_PATCH_SIZE}/{_F_PATCH_SIZE}, "
                f"which this one lacks ({config.all_patch_size}/{config.all_f_patch_size})"
            )
        super().__init__(vae=vae, pipeline=pipeline, clamp=clamp)
        self.transformer = transformer
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.max_sequence_length = int(max_sequence_length)
        self.in_channels = int(config.in_channels)
        self.patch_size = _PATCH_SIZE
        # multiple: the pipeline's `vae_scale_factor * 2` (the default side only applies to None)
        self._set_resolution(
            resolution, default_latent_side=128, multiple=self.patch_size, why="VAE factor × patch"
        )

    # ---- construction -----------------------------------------------------------------------------

    # ---- FlowModelAdapter -------------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C_latent, H / vae_scale_factor, W / vae_scale_factor)``."""
        height, width = self.resolution
        return (self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` at ``x_t``.

        Args:
            x_t: Noisy latents ``(B, C, H, W)``, ``H``, ``W`` divisible by the patch size (2).
            t: Times in ``[0, 1]`` (= the scheduler's σ), shape ``(B,)`` (a float or 0-dim tensor
                is broadcast).
            cond: A :class:`ZImageCondition` of batch size B.

        Returns:
            Velocity ``(B, C, H, W)`` in the dtype of ``x_t``.
        """
        batch = self._check_sample(x_t)
        t = check_time(t, batch, x_t.device)
        lengths = self._check_condition(cond, batch)
        dtype = self.transformer.all_x_embedder[f"{_PATCH_SIZE}-{_F_PATCH_SIZE}"].weight.dtype
        steps = float(self.num_train_timesteps)
        timestep = (steps - t.float() * steps) / steps  # the pipeline's (1000 − σ·1000) / 1000
        latents = list(x_t.to(dtype).unsqueeze(2).unbind(0))  # B × (C, 1, H, W)
        cap_feats = [cond.prompt_embeds[i, :n].to(dtype) for i, n in enumerate(lengths)]  # B × (L_i, D)
        out = self.transformer(
            latents,
            timestep,
            cap_feats,
            patch_size=_PATCH_SIZE,
            f_patch_size=_F_PATCH_SIZE,
            return_dict=False,
        )[0]
        return torch.stack(out, dim=0).squeeze(2).neg().to(x_t.dtype)

    @torch.no_grad()
    def encode_condition(self, raw: str | Sequence[str]) -> ZImageCondition:
        """Prompts → :class:`ZImageCondition` via the pipeline's ``encode_prompt`` (no CFG pairing).

        Raises:
            ValueError: If the adapter has no pipeline (or its text encoder was dropped) or ``raw``
                is not a string / non-empty list of strings.
        """
        prompts = [raw] if isinstance(raw, str) else list(raw)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("Z-Image conditions are prompts: a string or a non-empty sequence of strings")
        pipe = self._require_encoders()
        embeds, _ = pipe.encode_prompt(
            prompt=prompts,  # a fresh list: _encode_prompt overwrites its items with the chat template
            device=self._device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return ZImageCondition.from_list(embeds, self.max_sequence_length)

    # ---- Z-Image-specific -------------------------------------------------------------------------

    def condition_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """``pipe(prompt, **kwargs)`` arguments for the exported student.

        ``guidance_scale=0`` disables CFG in ``ZImagePipeline`` (``guidance_scale > 0`` enables it,
        unlike the other families' ``> 1``), and ``max_sequence_length`` is the one the conditions
        were trained with (the pipeline's default is 512).
        """
        return {
            "num_inference_steps": int(num_steps),
            "guidance_scale": 0.0,
            "max_sequence_length": self.max_sequence_length,
        }

    @staticmethod
    def _check_condition(cond: Condition, batch: int) -> list[int]:
        """Validate ``cond`` for a batch of ``batch``; its lengths as Python ints (one host sync)."""
        if not isinstance(cond, ZImageCondition):
            raise ValueError(
                f"cond must be a ZImageCondition (use encode_condition), got {type(cond).__name__}"
            )
        embeds, lengths = cond.prompt_embeds, cond.lengths
        if embeds.dim() != 3 or lengths.dim() != 1 or lengths.is_floating_point():
            raise ValueError(
                "ZImageCondition needs prompt_embeds (B, L, D) and integer lengths (B,), got "
                f"{tuple(embeds.shape)} and {tuple(lengths.shape)} {lengths.dtype}"
            )
        if embeds.shape[0] != batch or lengths.shape[0] != batch:
            raise ValueError(
                f"condition batch {embeds.shape[0]}/{lengths.shape[0]} does not match x_t batch {batch}"
            )
        values = lengths.tolist()
        if not all(1 <= n <= embeds.shape[1] for n in values):
            raise ValueError(f"ZImageCondition lengths must lie in [1, {embeds.shape[1]}], got {values}")
        return values


# --------------------------------------------------------------------------------------------------
# Random-weight pipelines and the family's registry entry.
# --------------------------------------------------------------------------------------------------


def random_pipeline(size: str, folder: Path, seed: int = 0) -> Any:
    """A random-weight pipeline of this family (``size`` in ``FAMILY.random_sizes``; scratch files
    such as the tokenizer go under ``folder``)."""
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = qwen_chat_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = transformers.Qwen3Model(
        transformers.Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[128, 16, 16],
    ).eval()
    with torch.no_grad():  # the pad tokens start at zero; random ones make padding matter
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


FAMILY = ModelFamily(
    name="zimage",
    adapter=ZImageAdapter,
    pipeline_class="ZImagePipeline",
    default_preset="zimage-8step",
    sampling_steps=50,
    sampling_guidance=5.0,
    random_sizes=("tiny",),
    random_pipeline=random_pipeline,
)
