"""Save and load LoRA adapters in the peft format that diffusers reads.

File layout written by :func:`save_lora` into a directory:

- ``pytorch_lora_weights.safetensors`` — keys ``<prefix>.<module name>.lora_A.weight`` (shape
  ``(r, in)``, or ``(r, in, kh, kw)`` for Conv2d) and ``<prefix>.<module name>.lora_B.weight``
  (``(out, r)`` or ``(out, r, 1, 1)``); the safetensors header carries diffusers' adapter
  metadata under ``"lora_adapter_metadata"``: a JSON object of peft ``LoraConfig`` fields with the
  same ``<prefix>.`` (``"transformer.r"``, ``"transformer.lora_alpha"``,
  ``"transformer.target_modules"``, ...). This is what a diffusers pipeline's
  ``save_lora_weights`` writes and what ``load_lora_weights`` / a model's
  ``load_lora_adapter(..., prefix="transformer")`` read; without the metadata diffusers would assume
  ``alpha = rank``.
- ``adapter_config.json`` — the same fields without prefix, as peft's ``LoraConfig`` JSON.

The default ``prefix="transformer"`` fits SD3/Flux/Z-Image/DiT transformers; use ``"unet"`` for
SDXL's UNet or ``None`` for a model-level file (``ModelMixin.save_lora_adapter`` layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dmdr_fast._io import open_safetensors
from dmdr_fast.models.lora import LoraLayer, _attach, _freeze_non_lora, lora_layers

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "LORA_WEIGHTS_NAME",
    "load_lora",
    "lora_adapter_config",
    "lora_state_dict",
    "save_lora",
]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_PEFT_MODEL_PREFIX = "base_model.model."  # keys of peft's PeftModel.save_pretrained
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def _adapter_layers(model: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    layers = {name: layer for name, layer in lora_layers(model) if adapter in layer.lora_A}
    if not layers:
        raise ValueError(f"no LoRA adapter named {adapter!r} in the model")
    return layers


def lora_state_dict(
    model: nn.Module,
    adapter: str = "default",
    *,
    prefix: str | None = "transformer",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The adapter's factors under peft/diffusers key names.

    Args:
        model: A model with LoRA adapter ``adapter``.
        adapter: Adapter name.
        prefix: Component prefix prepended to every key (``"transformer"``), or ``None``.
        dtype: Cast the factors to this dtype (default: keep their dtype, fp32 when trained).

    Returns:
        ``{"<prefix>.<module>.lora_A.weight": A, "<prefix>.<module>.lora_B.weight": B, ...}``,
        detached contiguous tensors.
    """
    lead = f"{prefix}." if prefix else ""
    state: dict[str, torch.Tensor] = {}
    for name, layer in _adapter_layers(model, adapter).items():
        for suffix, factor in ((_A_SUFFIX, layer.lora_A[adapter]), (_B_SUFFIX, layer.lora_B[adapter])):
            weight = factor.weight
            assert isinstance(weight, torch.Tensor)  # an nn.Linear / nn.Conv2d factor
            tensor = weight.detach()
            state[lead + name + suffix] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
    return state


def lora_adapter_config(model: nn.Module, adapter: str = "default") -> dict[str, Any]:
    """peft ``LoraConfig`` fields describing the adapter (r, lora_alpha, target_modules, ...).

    Raises:
        ValueError: If the adapter's layers have different ranks or alphas (only uniform adapters
            are exported, because peft's per-module ``rank_pattern`` key syntax varies by version).
    """
    layers = _adapter_layers(model, adapter)
    ranks = {layer.lora_rank[adapter] for layer in layers.values()}
    alphas = {layer.lora_alpha[adapter] for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"adapter {adapter!r} has non-uniform ranks {sorted(ranks)} or alphas {sorted(alphas)}; "
            "only uniform adapters can be exported"
        )
    alpha = alphas.pop()
    return {
        "r": ranks.pop(),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian",
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_lora(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter: str = "default",
    *,
    prefix: str | None = "transformer",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the adapter as ``pytorch_lora_weights.safetensors`` + ``adapter_config.json``.

    Args:
        model: A model with LoRA adapter ``adapter``.
        directory: Output directory (created if missing).
        adapter: Adapter name.
        prefix: Component prefix of keys and metadata (``"transformer"``, ``"unet"``, ``None``).
        dtype: Optional dtype for the saved factors (e.g. ``torch.bfloat16``).

    Returns:
        Path of the safetensors file.
    """
    out_dir = Path(directory)
    if out_dir.is_file():
        raise ValueError(f"save_lora needs a directory, got the file {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = lora_adapter_config(model, adapter)
    lead = f"{prefix}." if prefix else ""
    header = {
        "format": "pt",
        _METADATA_KEY: json.dumps({lead + k: v for k, v in config.items()}, sort_keys=True),
    }
    path = out_dir / LORA_WEIGHTS_NAME
    save_file(lora_state_dict(model, adapter, prefix=prefix, dtype=dtype), str(path), metadata=header)
    peft_json = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, **config}
    (out_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_json, indent=2, sort_keys=True) + "\n")
    return path


def _read(path: Path, prefix: str | None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any] | None]:
    """Factors grouped by module name, and the unprefixed LoraConfig fields if the file has them."""
    file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file}")
    with open_safetensors(file) as handle:
        header = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    config: dict[str, Any] | None = None
    if _METADATA_KEY in header:
        raw = json.loads(header[_METADATA_KEY])
        lead = f"{prefix}." if prefix else ""
        if lead and any(k.startswith(lead) for k in raw):
            config = {k[len(lead) :]: v for k, v in raw.items() if k.startswith(lead)}
        else:  # a model-level file (saved without a component prefix)
            config = raw
    elif (file.parent / ADAPTER_CONFIG_NAME).is_file():
        config = json.loads((file.parent / ADAPTER_CONFIG_NAME).read_text())
    if prefix and any(k.startswith(prefix + ".") for k in tensors):
        # A pipeline file may hold several components (transformer., text_encoder., ...).
        tensors = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    tensors = {k.removeprefix(_PEFT_MODEL_PREFIX): v for k, v in tensors.items()}
    bad = [k for k in tensors if not (k.endswith(_A_SUFFIX) or k.endswith(_B_SUFFIX))]
    if bad:
        raise ValueError(f"unsupported keys in {file} (only lora_A/lora_B weights are supported): {bad[:5]}")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, part = key[: -len(_A_SUFFIX)], key[-len(_A_SUFFIX) + 1 : -len(".weight")]
        grouped.setdefault(name, {})[part] = value
    incomplete = [n for n, parts in grouped.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise ValueError(f"{file}: modules without both lora_A and lora_B: {incomplete[:5]}")
    return grouped, config


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter: str = "default",
    *,
    prefix: str | None = "transformer",
    freeze_base: bool = True,
) -> list[str]:
    """Load a LoRA file (ours, a diffusers pipeline's, or peft's ``adapter_model.safetensors``).

    If the model already has adapter ``adapter``, the file must cover exactly its modules with the
    same ranks and alpha, and the factors are copied in. Otherwise the adapter is created on the
    modules named in the file (rank from the tensors, alpha from the metadata, or alpha = rank
    when the file has none — the diffusers convention).

    Args:
        model: The base model (with or without the adapter).
        path: A safetensors file or a directory holding ``pytorch_lora_weights.safetensors``.
        adapter: Adapter name to load into.
        prefix: Component prefix to select and strip (``"transformer"``); ignored if no key has it.
        freeze_base: When creating the adapter, freeze all non-LoRA parameters.

    Returns:
        Qualified names of the modules that received weights.

    Raises:
        ValueError: On keys, modules, shapes, ranks or alphas that do not fit the model.
    """
    grouped, config = _read(Path(path), prefix)
    if config and config.get("alpha_pattern"):
        raise NotImplementedError("LoRA files with a per-module alpha_pattern are not supported")
    if config and config.get("use_dora"):
        raise NotImplementedError("DoRA adapters are not supported")
    existing = {name: layer for name, layer in lora_layers(model) if adapter in layer.lora_A}
    if existing and set(existing) != set(grouped):
        missing, extra = sorted(set(existing) - set(grouped)), sorted(set(grouped) - set(existing))
        raise ValueError(
            f"LoRA file does not match adapter {adapter!r}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, parts in grouped.items():
        rank = parts["lora_A"].shape[0]
        alpha = float(config["lora_alpha"]) if config and "lora_alpha" in config else float(rank)
        if name in existing:
            layer = existing[name]
            if layer.lora_rank[adapter] != rank or layer.lora_alpha[adapter] != alpha:
                raise ValueError(
                    f"module {name!r}: file has rank {rank}, alpha {alpha:g}; adapter {adapter!r} has rank "
                    f"{layer.lora_rank[adapter]}, alpha {layer.lora_alpha[adapter]:g}"
                )
        else:
            try:
                model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(
                    f"LoRA file has weights for {name!r}, which the model does not have"
                ) from err
            layer = _attach(model, name, adapter, rank, alpha, "kaiming")
        for part in ("lora_A", "lora_B"):
            target = getattr(layer, part)[adapter].weight
            value = parts[part]
            if value.shape != target.shape:
                raise ValueError(
                    f"{name}.{part}: file shape {tuple(value.shape)} != model {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    if not existing and freeze_base:
        _freeze_non_lora(model)
    return sorted(grouped)
