"""Published architectures of the preset models, built on the meta device (no download, no memory).

The numbers are facts from each model's public diffusers / transformers ``config.json`` (the
repository named next to each entry); only the keys that change the parameter count are kept.
A network built from them under ``torch.device("meta")`` has the real parameter count and shapes
but no storage, so :mod:`dmdr_fast.plan.memory` can count it (and :func:`dmdr_fast.models.fp8.fp8_plan`
can count its FP8 bytes) in milliseconds.

When ``model.path`` names a local diffusers folder, :func:`build_meta_parts` reads the folder's own
``config.json`` files instead, so a fine-tuned or differently sized checkpoint is counted as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmdr_fast._errors import UserError
from dmdr_fast.models.dit import DIGITS_DIT  # re-exported: the digits presets' DiT

__all__ = [
    "DIGITS_DIT",
    "FAMILY_PARTS",
    "REWARD_PARAMS",
    "MetaParts",
    "build_meta_parts",
    "tokens_and_width",
]

# --- denoisers --------------------------------------------------------------------------------
_SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (2.0B)
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192,
}  # fmt: skip
_SD35_LARGE = {  # stabilityai/stable-diffusion-3.5-large transformer/config.json (8.1B, 38 layers)
    **_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}  # fmt: skip
_FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json (11.9B)
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
_ZIMAGE = {  # Tongyi-MAI/Z-Image transformer/config.json (6.2B)
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "qk_norm": True, "cap_feat_dim": 2560,
}  # fmt: skip
_SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.6B)
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
}  # fmt: skip

# --- VAEs (AutoencoderKL, 84M) ------------------------------------------------------------------
_VAE = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}  # fmt: skip
#: SD3 / SD3.5 / Flux / Z-Image: 16 latent channels, no quant convs; SDXL: 4 channels with them.
_VAE16 = {**_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
_VAE4 = {**_VAE, "latent_channels": 4}

# --- text encoders (transformers configs) -------------------------------------------------------
_CLIP_L = {  # openai/clip-vit-large-patch14 text tower (123M): SD3, Flux, SDXL text_encoder
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "projection_dim": 768, "max_position_embeddings": 77,
}  # fmt: skip
_CLIP_BIGG = {  # laion OpenCLIP ViT-bigG/14 text tower (695M): SD3 text_encoder_2, SDXL text_encoder_2
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "projection_dim": 1280, "max_position_embeddings": 77,
    "hidden_act": "gelu",
}  # fmt: skip
_T5_XXL = {  # google/t5-v1_1-xxl encoder (4.76B): SD3 text_encoder_3, Flux text_encoder_2
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "feed_forward_proj": "gated-gelu",
}  # fmt: skip
_QWEN3_4B = {  # Qwen/Qwen3-4B (4.0B, tied embeddings): Z-Image text_encoder
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
}  # fmt: skip

#: family → (denoiser class, config, VAE config, [(text encoder class, config)]).
FAMILY_PARTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[tuple[str, dict[str, Any]]]]] = {
    "sd3-medium": (
        "SD3Transformer2DModel", _SD3_MEDIUM, _VAE16,
        [("CLIPTextModelWithProjection", _CLIP_L), ("CLIPTextModelWithProjection", _CLIP_BIGG),
         ("T5EncoderModel", _T5_XXL)],
    ),
    "sd35-large": (
        "SD3Transformer2DModel", _SD35_LARGE, _VAE16,
        [("CLIPTextModelWithProjection", _CLIP_L), ("CLIPTextModelWithProjection", _CLIP_BIGG),
         ("T5EncoderModel", _T5_XXL)],
    ),
    "flux": ("FluxTransformer2DModel", _FLUX_DEV, _VAE16, [("CLIPTextModel", _CLIP_L), ("T5EncoderModel", _T5_XXL)]),
    "zimage": ("ZImageTransformer2DModel", _ZIMAGE, _VAE16, [("Qwen3Model", _QWEN3_4B)]),
    "sdxl": (
        "UNet2DConditionModel", _SDXL_UNET, _VAE4,
        [("CLIPTextModel", _CLIP_L), ("CLIPTextModelWithProjection", _CLIP_BIGG)],
    ),
}  # fmt: skip

#: Reward models by ``rewards[].kind``: parameters (counted from a table: the presets leave their
#: paths null, so nothing can be built), kept in bf16 and replicated on every rank. clip / hps:
#: OpenCLIP ViT-H/14 (DFN5B-CLIP, HPSv2.1), image + text towers. jpeg / ink: no network.
REWARD_PARAMS: dict[str, int] = {"clip": 986_109_440, "hps": 986_109_440, "jpeg": 0, "ink": 0}

_TEXT_CONFIGS = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
    "Qwen3Model": "Qwen3Config",
}


@dataclass(frozen=True)
class MetaParts:
    """The networks of a text-to-image run on the meta device.

    Attributes:
        denoiser: the transformer / UNet (teacher, student copy, critic copy all have its shape).
        vae: the autoencoder (frozen).
        text_encoders: the frozen text encoders, in pipeline order.
        source: where the configs came from (``"published <key>"`` or the local folder).
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    source: str


def _diffusers_model(cls_name: str, config: dict[str, Any]) -> nn.Module:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    assert isinstance(model, nn.Module)
    return model


def _text_model(cls_name: str, config: dict[str, Any]) -> nn.Module:
    import transformers

    cfg = getattr(transformers, _TEXT_CONFIGS[cls_name])(**config)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg)
    assert isinstance(model, nn.Module)
    return model


def _published_key(family: str, name: str) -> str:
    """Which published model a preset of ``family`` means (SD3: SD3.5-Large when the run's name
    says ``sd35-large``, else SD3-Medium)."""
    if family != "sd3":
        return family
    return "sd35-large" if "sd35-large" in name else "sd3-medium"


def _from_folder(folder: Path) -> MetaParts:
    """The parts of a local diffusers pipeline folder, from its ``config.json`` files."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    denoiser = vae = None
    encoders: list[nn.Module] = []
    for name in sorted(index):
        entry = index[name]
        if name.startswith("_") or not isinstance(entry, list) or entry[1] is None:
            continue
        cls_name = entry[1]
        sub = folder / name
        if hasattr(diffusers, cls_name) and (sub / "config.json").is_file():
            cls = getattr(diffusers, cls_name)
            config = cls.load_config(str(sub))
            with torch.device("meta"):
                module = cls.from_config(config)
            if name in ("transformer", "unet"):
                denoiser = module
            elif name == "vae":
                vae = module
        elif name.startswith("text_encoder") and hasattr(transformers, cls_name):
            cfg = transformers.AutoConfig.from_pretrained(str(sub))
            with torch.device("meta"):
                encoders.append(getattr(transformers, cls_name)(cfg))
    if denoiser is None or vae is None:
        raise ValueError(f"{folder}: no transformer/unet or vae config in the pipeline folder")
    return MetaParts(denoiser, vae, encoders, str(folder))


def build_meta_parts(family: str, path: str | None, name: str) -> MetaParts:
    """The meta-device networks of a text-to-image preset.

    Args:
        family: ``model.family`` (sd3, flux, zimage, sdxl).
        path: ``model.path``: a local diffusers folder (its configs are read), or None for the
            published architecture (:data:`FAMILY_PARTS`).

    Raises:
        UserError: For a ``path`` that is not a diffusers pipeline folder.
        name: the run's name (SD3: ``sd35-large`` in it picks SD3.5-Large, else SD3-Medium).
    """
    if path is not None:
        if not (Path(path) / "model_index.json").is_file():
            raise UserError(f"model.path {path}: not a diffusers pipeline folder (no model_index.json)")
        return _from_folder(Path(path))
    key = _published_key(family, name)
    if key not in FAMILY_PARTS:
        raise ValueError(f"no published architecture for {key!r}; known: {sorted(FAMILY_PARTS)}")
    cls_name, config, vae, texts = FAMILY_PARTS[key]
    return MetaParts(
        _diffusers_model(cls_name, config),
        _diffusers_model("AutoencoderKL", vae),
        [_text_model(c, cfg) for c, cfg in texts],
        f"published {key}",
    )


def tokens_and_width(
    network: nn.Module, resolution: int, text_tokens: int, vae_factor: int = 8
) -> list[tuple[int, int]]:
    """``(tokens, width)`` of the residual stream of every block: what the activation model scales.

    Transformers: image tokens ``(resolution / vae_factor / patch)²`` plus the text tokens (joint / single
    blocks and Z-Image's main layers carry both; its refiners one each). UNets: every resnet /
    transformer layer of each level carries ``(latent side / 2^level)²`` pixels × the level's channels.
    Digits DiT (class-conditional): ``(sample / patch)²`` tokens, no text.
    """
    cfg = dict(getattr(network, "config", {}))
    if "block_out_channels" in cfg and "down_block_types" in cfg:  # UNet
        side = resolution // vae_factor
        out: list[tuple[int, int]] = []
        layers = cfg.get("transformer_layers_per_block", 1)
        layers = layers if isinstance(layers, (list, tuple)) else [layers] * len(cfg["block_out_channels"])
        for level, (width, kind) in enumerate(
            zip(cfg["block_out_channels"], cfg["down_block_types"], strict=True)
        ):
            pixels = (side >> level) ** 2
            depth = 1 + (layers[level] if "CrossAttn" in kind else 0)  # resnet + transformer layers
            # down path: layers_per_block, up path: layers_per_block + 1 (diffusers' UNet)
            out += [(pixels, width)] * depth * (2 * cfg["layers_per_block"] + 1)
        return out
    if "dim" in cfg and "n_layers" in cfg:  # Z-Image
        img = (resolution // vae_factor // cfg["all_patch_size"][0]) ** 2
        refiners = [(img, cfg["dim"]), (text_tokens, cfg["dim"])] * cfg["n_refiner_layers"]
        return refiners + [(img + text_tokens, cfg["dim"])] * cfg["n_layers"]
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if "num_classes" in cfg or cfg.get("num_embeds_ada_norm"):  # class-conditional DiT
        return [((cfg["sample_size"] // cfg["patch_size"]) ** 2, width)] * cfg["num_layers"]
    img = (resolution // vae_factor // cfg["patch_size"]) ** 2
    if "num_single_layers" in cfg:  # Flux packs 2×2 latents into one token
        img = (resolution // vae_factor // 2) ** 2
    blocks = cfg["num_layers"] + cfg.get("num_single_layers", 0)
    return [(img + text_tokens, width)] * blocks
