"""Random-weight diffusers pipelines assembled from configs: for tests, CPU smoke runs and GPU benchmarks.

Nothing is downloaded: tokenizers are byte-level BPE vocabularies written on the fly, every model is
built from a config with seeded random weights. Sizes:

- ``tiny``: a few thousand parameters per component, 16×16-pixel images — the round-trip tests and
  the CPU smoke runs of ``dmdr-fast train`` / ``bench`` use it;
- ``sd35-medium`` (SD3 only): the SD3.5-Medium transformer (24 layers, 24 heads × 64, dual attention
  in the first 13 layers, 2.5B parameters) and the SD3 VAE at their real sizes, with tiny text
  encoders (their outputs are padded to the transformer's widths): what a DMDR step costs on a GPU
  does not depend on the weights, and with the prompt cache the text encoders are not in the step.

``dmdr-fast make-pipeline --family sd3 --size tiny --out DIR`` writes one to a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["SIZES", "build_random_pipeline", "byte_level_clip_tokenizer", "save_random_pipeline"]

SIZES = {"sd3": ("tiny", "sd35-medium")}


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


def _clip(tokenizer: Any, *, hidden: int, projection: int, tokens: int, seed: int) -> Any:
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
    return transformers.CLIPTextModelWithProjection(config).eval()


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
            joint_attention_dim=2 * clip_hidden,
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
        text_encoder_3=None,
        tokenizer_3=None,
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
    builders = {"sd3": _sd3}
    return builders[family](folder, size, seed)


def save_random_pipeline(family: str, size: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build a random pipeline and ``save_pretrained`` it to ``out_dir``; returns the folder."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_random_pipeline(family, size, out, seed=seed)
    pipe.save_pretrained(str(out))
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out
