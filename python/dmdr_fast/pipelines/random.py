"""Random-weight diffusers pipelines assembled from configs: for tests, CPU smoke runs and GPU benchmarks.

Nothing is downloaded: tokenizers are byte-level BPE vocabularies written on the fly, every model is
built from a config with seeded random weights. Sizes:

- ``tiny``: a few thousand parameters per component, 16×16-pixel images — the round-trip tests and
  the CPU smoke runs of ``dmdr-fast train`` / ``bench`` use it;
- ``sd35-medium`` (SD3 only): the SD3.5-Medium transformer (24 layers, 24 heads × 64, dual attention
  in the first 13 layers, 2.2B parameters) and the SD3 VAE at their real sizes, with tiny text
  encoders (CLIP outputs are padded to the transformer's width; a one-layer 4096-wide T5): what a DMDR step costs on a GPU
  does not depend on the weights, and with the prompt cache the text encoders are not in the step.

``dmdr-fast make-pipeline --family sd3 --size tiny --out DIR`` writes one to a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SIZES",
    "build_random_pipeline",
    "byte_level_clip_tokenizer",
    "char_t5_tokenizer",
    "qwen_chat_tokenizer",
    "save_random_pipeline",
]

SIZES = {"sd3": ("tiny", "sd35-medium"), "flux": ("tiny",), "zimage": ("tiny",), "sdxl": ("tiny",)}

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def byte_level_clip_tokenizer(folder: str | os.PathLike[str], max_length: int) -> Any:
    """A CLIP tokenizer over the 256 byte symbols (no merges), written to ``folder``.

    Every prompt tokenizes (one token per byte), which is all random text encoders need.
    """
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def char_t5_tokenizer() -> Any:
    """A character-level T5 (Unigram) tokenizer: pad/eos/unk, letters, digits and ``▁letter``."""
    import string

    import transformers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)


def qwen_chat_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer (3 special tokens + 256 byte symbols) with a Qwen3 chat template."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*special, *sorted(ByteLevel.alphabet())])}
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=special[1:])
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _t5(tokenizer: Any, width: int, seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=4, d_ff=16, num_layers=1, num_heads=2
    )
    return transformers.T5EncoderModel(config).eval()


def _tiny_vae(seed: int, scaling: float, shift: float | None) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling,
        shift_factor=shift,
    ).eval()


def _clip(tokenizer: Any, *, hidden: int, projection: int, tokens: int, seed: int, cls: Any = None) -> Any:
    """A 2-layer CLIP text model (``cls``: default ``CLIPTextModelWithProjection``)."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (cls or transformers.CLIPTextModelWithProjection)(config).eval()


def _sd3(folder: Path, size: str, seed: int) -> Any:
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
        vae_kwargs = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
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
    t5_tokenizer = char_t5_tokenizer()
    t5 = _t5(t5_tokenizer, transformer.config.joint_attention_dim, seed + 4)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=_clip(tokenizer, hidden=clip_hidden, projection=clip_proj, tokens=tokens, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_clip(
            tokenizer, hidden=clip_hidden, projection=clip_proj, tokens=tokens, seed=seed + 3
        ),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def _flux(folder: Path, size: str, seed: int) -> Any:
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = byte_level_clip_tokenizer(folder / "_tokenizer", 8)
    clip = _clip(tokenizer, hidden=8, projection=4, tokens=8, seed=seed + 2, cls=transformers.CLIPTextModel)
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
        guidance_embeds=True,  # like Flux-dev
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Flux-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_tiny_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=_t5(t5_tokenizer, 12, seed + 3),
        tokenizer_2=t5_tokenizer,
    )


def _zimage(folder: Path, size: str, seed: int) -> Any:
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
        vae=_tiny_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _sdxl(folder: Path, size: str, seed: int) -> Any:
    import transformers
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = byte_level_clip_tokenizer(folder / "_tokenizer", 8)

    def clip(cls: type, s: int) -> Any:
        return _clip(tokenizer, hidden=8, projection=4, tokens=8, seed=s, cls=cls)

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
        vae=_tiny_vae(seed + 1, 0.13025, None),
        text_encoder=clip(transformers.CLIPTextModel, seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=clip(transformers.CLIPTextModelWithProjection, seed + 3),
        tokenizer_2=tokenizer,
        add_watermarker=False,
    )


def build_random_pipeline(family: str, size: str, folder: str | os.PathLike[str], *, seed: int = 0) -> Any:
    """A random-weight pipeline of ``family`` and ``size`` (scratch files go under ``folder``).

    Raises:
        ValueError: For an unknown family or size.
    """
    sizes = SIZES.get(family)
    if sizes is None:
        raise ValueError(f"no random pipeline builder for family {family!r}; families: {sorted(SIZES)}")
    if size not in sizes:
        raise ValueError(f"family {family!r} has sizes {list(sizes)}, got {size!r}")
    folder = Path(folder)
    builders = {"sd3": _sd3, "flux": _flux, "zimage": _zimage, "sdxl": _sdxl}
    return builders[family](folder, size, seed)


def save_random_pipeline(
    family: str,
    size: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a random pipeline and ``save_pretrained`` it to ``out_dir``; returns the folder.

    Args:
        dtype: Weights dtype of the saved files (default fp32; bf16 halves a real-size folder).
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_random_pipeline(family, size, out, seed=seed)
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(str(out))
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out
