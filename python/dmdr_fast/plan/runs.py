"""A run's config → its :class:`~dmdr_fast.plan.memory.RunMemory`, from networks on the meta device.

:func:`run_memory` counts given networks (real ones in the validation test, meta ones here);
:func:`preset_memory` builds a preset's networks on the meta device first: the digits DiT from the
preset's ``model.kwargs.teacher.model``, the text-to-image parts from the published architectures
(or ``model.path``'s configs, :mod:`dmdr_fast.plan.architectures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models.lora import LoraConfig, inject_lora, lora_parameters
from dmdr_fast.plan.architectures import DIGITS_DIT, REWARD_PARAMS, build_meta_parts, tokens_and_width
from dmdr_fast.plan.memory import (
    Part,
    RunMemory,
    activation_bytes,
    checkpointed_block_bytes,
    dtype_bytes,
    frozen_bytes,
    largest_block_numel,
    network_bytes,
)

__all__ = ["preset_memory", "run_memory"]

_T2I = ("sd3", "flux", "zimage", "sdxl")


def _lora_params(
    network: nn.Module, spec: Any, adapter: str, default_targets: Sequence[str]
) -> tuple[int, int]:
    """(parameters, tensors) of a LoRA adapter injected as the Trainer does (on this network, in place)."""
    targets = tuple(spec.targets) or tuple(default_targets)
    cfg = LoraConfig(targets=targets, rank=spec.rank, alpha=spec.alpha, init=spec.init, adapter=adapter)
    inject_lora(network, cfg, freeze_base=True)
    factors = list(lora_parameters(network, adapter))
    return sum(p.numel() for p in factors), len(factors)


def _text_tokens(config: DMDRTrainerConfig) -> int:
    """Text tokens in the denoiser's residual stream (SD3: 77 CLIP + T5; Flux: T5; Z-Image: Qwen,
    padded to 32; SDXL / class-conditional: none, the text enters by cross-attention only)."""
    fam, kw = config.model.family, config.model.kwargs
    if fam == "sd3":
        return 77 + int(kw.get("max_sequence_length", 256))
    if fam == "flux":
        return int(kw.get("max_sequence_length", 512))
    if fam == "zimage":
        return -(-int(kw.get("max_sequence_length", 512)) // 32) * 32
    return 0


def run_memory(
    config: DMDRTrainerConfig,
    teacher: nn.Module,
    *,
    default_targets: Sequence[str] = (),
    frozen: Sequence[tuple[str, nn.Module]] = (),
    notes: Sequence[str] = (),
    vae_factor: int = 8,
) -> RunMemory:
    """Count a run's per-rank memory (before sharding) from its teacher network.

    Args:
        config: the run.
        teacher: the denoiser as built (real or meta tensors); LoRA adapters are injected into it.
        default_targets: the family's LoRA targets (when a LoRA section lists none).
        frozen: other frozen networks on the GPU (VAE, text encoders), counted in the load dtype.
        notes: remarks carried to the table.
        vae_factor: pixels per latent pixel (image tokens = (resolution / vae_factor / patch)²).
    """
    t2i = config.model.family in _T2I
    s, c = config.student, config.critic
    params, _ = network_bytes(teacher)
    block = largest_block_numel(teacher)
    load = dtype_bytes(config.model.load_dtype) if t2i else 4
    parts = [Part("teacher (frozen)", params, frozen_bytes(config, teacher, t2i), True)]
    trainable = tensors = 0  # tensors: AdamW keeps a 4-byte step count per parameter tensor
    n_tensors = len(list(teacher.parameters()))
    if s.kind == "full":
        _, fp32 = network_bytes(teacher, 4)
        parts.append(Part("student weights (fp32)", params, fp32, True))
        trainable, tensors = trainable + params, tensors + n_tensors
        student_block = 4 * block
    else:
        lora, k = _lora_params(teacher, s.lora, "student", default_targets)
        parts.append(Part("student LoRA (fp32)", lora, 4 * lora, True))
        # FSDP: the student's own copy of the frozen base (counted before any LoRA was injected)
        parts.append(Part("student base (frozen, FSDP copy)", params, parts[0].nbytes, True, fsdp_only=True))
        trainable, tensors = trainable + lora, tensors + k
        student_block = 0
    student_trainable = trainable
    if c.kind == "full":
        _, fp32 = network_bytes(teacher, 4)
        parts.append(Part("critic copy (fp32)", params, fp32, True))
        trainable, tensors = trainable + params, tensors + n_tensors
    else:
        lora, k = _lora_params(teacher, c.lora, "critic", default_targets)
        parts.append(Part("critic LoRA (fp32)", lora, 4 * lora, True))
        trainable, tensors = trainable + lora, tensors + k
    parts.append(Part("gradients (fp32)", 0, 4 * trainable, True))
    parts.append(Part("AdamW moments (2 x fp32)", 0, 8 * trainable + 4 * tensors, True))
    if s.ema_decay > 0:
        ema = params if s.kind == "full" else sum(p.numel() for p in lora_parameters(teacher, "student"))
        parts.append(Part("EMA (fp32)", ema, 4 * ema, True))
    for name, module in frozen:
        n, nbytes = network_bytes(module, load)
        parts.append(Part(name, n, nbytes, False))
    extra = list(notes)
    for reward in config.active_rewards:
        size = REWARD_PARAMS.get(reward.kind)
        if size is None:
            extra.append(f"reward {reward.name!r} ({reward.kind}): not counted (size not in the table)")
        elif size:
            parts.append(Part(f"reward {reward.name} (bf16, table)", size, 2 * size, False))
    tr = config.train
    resolution = int(config.model.kwargs.get("resolution", 1024))
    blocks = tokens_and_width(teacher, resolution, _text_tokens(config), vae_factor)
    ckpt = config.model.gradient_checkpointing
    act = activation_bytes(
        blocks,
        tr.batch_size,
        checkpointing=ckpt,
        precision=tr.precision,
        graphs=2 if s.backward_sim == "trajectory" else 1,
        cfg=config.dmdr.guidance > 1,
    )
    phases: tuple[tuple[int, int], ...] = ()
    if ckpt:  # the forwards run before the student's gradients exist (docs/plan.md §2)
        student_grads = 4 * student_trainable
        phases = (
            (checkpointed_block_bytes(blocks, tr.batch_size, precision=tr.precision), 0),
            (act, student_grads),
        )
        act = max(a - g for a, g in phases)
    # One gathered block: the frozen teacher's in its dtype, a full student's in fp32 (the larger).
    block_bytes = max(block * load, student_block)
    return RunMemory(tuple(parts), trainable, act, block_bytes, tuple(extra), phases)


def preset_memory(config: DMDRTrainerConfig) -> RunMemory:
    """Build ``config``'s networks on the meta device and count them (:func:`run_memory`)."""
    fam = config.model.family
    if fam == "digits" or fam == "dit":
        from dmdr_fast.models import tiny_dit

        teacher_kw = config.model.kwargs.get("teacher", {}) if fam == "digits" else config.model.kwargs
        arch = {**DIGITS_DIT, **dict(teacher_kw.get("model", {}) if fam == "digits" else teacher_kw)}
        with torch.device("meta"):
            net = tiny_dit(**arch, seed=None)
        return run_memory(config, net)
    if fam not in _T2I:
        raise ValueError(f"no planner for model.family {fam!r}")
    from dmdr_fast.models.families import get_family

    parts = build_meta_parts(fam, config.model.path, config.name)
    frozen: list[tuple[str, nn.Module]] = [("VAE (frozen)", parts.vae)]
    notes = [f"architecture: {parts.source}"]
    if config.data.cache is not None and config.data.offload_text_encoders:
        notes.append("text encoders: dropped (data.cache + data.offload_text_encoders)")
    else:
        frozen += [(f"text encoder {i + 1} (frozen)", m) for i, m in enumerate(parts.text_encoders)]
    if config.active_rewards and not config.rl.enabled:  # ReFL: rewards differentiated
        notes.append("stage 2 (rewards): VAE-decode and reward activations not modelled (docs/plan.md §2)")
    targets = get_family(fam).adapter.default_lora_targets
    vae_config: Any = getattr(parts.vae, "config", {})  # diffusers' FrozenDict
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return run_memory(
        config, parts.denoiser, default_targets=targets, frozen=frozen, notes=notes, vae_factor=factor
    )
