"""FP8 sampling of a diffusers pipeline: its denoiser's linears in e4m3, its attention FP8.

``dmdr-fast sample --fp8`` and ``bench sample --fp8`` use this on an exported student (docs/fp8.md).
A LoRA loaded with ``pipe.load_lora_weights`` is first fused into the base weights (diffusers'
``fuse_lora`` + ``unload_lora_weights``), so that the merged weights are what gets quantised —
peft's LoRA wrappers would otherwise keep the targeted linears out of reach.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dmdr_fast.models.fp8 import DEFAULT_FP8_EXCLUDE, Fp8Report, quantize_for_inference

__all__ = ["denoiser_of", "quantize_pipeline"]


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of the pipeline's denoiser (``transformer`` or ``unet``)."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise TypeError(f"{type(pipe).__name__} has neither a `transformer` nor a `unet` to quantise")


def quantize_pipeline(
    pipe: Any, *, exclude: tuple[str, ...] = DEFAULT_FP8_EXCLUDE, attention: bool = True
) -> Fp8Report:
    """Make ``pipe``'s denoiser sample in FP8, in place (text encoders and VAE are untouched).

    Args:
        pipe: A loaded diffusers pipeline (an exported student, or a teacher with a student LoRA).
        exclude: Module-name patterns kept in their dtype (default: embeddings, norms/modulation,
            final projection).
        attention: Also compute the denoiser's attention with ``attention_fp8``.

    Returns:
        What was quantised.
    """
    adapters = getattr(pipe, "get_list_adapters", None)
    if adapters is not None and any(adapters().values()):
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    _, net = denoiser_of(pipe)
    return quantize_for_inference(net, exclude=exclude, attention=attention)
