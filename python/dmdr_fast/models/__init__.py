"""Model adapters (diffusers networks → the flow-matching convention) and LoRA with per-sample scales.

- :mod:`~dmdr_fast.models.protocol` — :class:`FlowModelAdapter`, the protocol every family implements.
- :mod:`~dmdr_fast.models.lora` / :mod:`~dmdr_fast.models.lora_io` — LoRA injection, per-sample
  scales, merging, and peft/diffusers-format files.
- :mod:`~dmdr_fast.models.dit` — class-conditional diffusers DiT adapter and tiny-DiT factories.
- :mod:`~dmdr_fast.models.roles` — student / guidance construction.
- :mod:`~dmdr_fast.models.attention` — route diffusers attention through :func:`dmdr_fast.ops.attention`.
- :mod:`~dmdr_fast.models.t2i` — :class:`TextToImageAdapter`, the base of the text-to-image adapters
  (null-condition cache, prompt-cache fingerprint, exported scheduler and its exact grid, memory).
- :mod:`~dmdr_fast.models.sd3`, :mod:`~dmdr_fast.models.flux`, :mod:`~dmdr_fast.models.zimage`,
  :mod:`~dmdr_fast.models.sdxl` — SD3/SD3.5, Flux, Z-Image and SDXL (ε → flow) pipelines, each
  registered in :mod:`~dmdr_fast.models.families` (``from dmdr_fast.models import SD3Adapter``
  resolves through it); random-weight pipelines are built from :mod:`~dmdr_fast.models.random_parts`.
"""

from typing import TYPE_CHECKING, Any

from dmdr_fast.models.lora import (
    LoraConfig,
    LoraConv2d,
    LoraLayer,
    LoraLinear,
    ScaleSpec,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_scale,
    merge_and_unload,
    merged_state_dict,
    set_lora_scale,
)
from dmdr_fast.models.lora_io import (
    ADAPTER_CONFIG_NAME,
    LORA_WEIGHTS_NAME,
    load_lora,
    lora_adapter_config,
    lora_state_dict,
    save_lora,
)
from dmdr_fast.models.protocol import Condition, FlowModelAdapter
from dmdr_fast.models.roles import make_guidance, make_student

# The DiT and attention names import diffusers (seconds); load them on first use so that
# `import dmdr_fast.models` (LoRA, protocol) stays cheap.
_LAZY_DIT = (
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_LORA_TARGETS",
    "DiTAdapter",
    "dit_from_config",
    "tiny_dit",
)
_LAZY_ATTENTION = ("attention_backend", "restore_attention", "use_attention")


def __getattr__(name: str) -> Any:
    if name in _LAZY_DIT:
        from dmdr_fast.models import dit

        return getattr(dit, name)
    if name in _LAZY_ATTENTION:
        from dmdr_fast.models import attention

        return getattr(attention, name)
    if name == "TextToImageAdapter":
        from dmdr_fast.models.t2i import TextToImageAdapter

        return TextToImageAdapter
    # A family's public names (SD3Adapter, FluxCondition, SDXL_LORA_TARGETS, ...) come from its
    # module in the family registry; nothing here lists them again.
    if name.startswith("_"):  # dunder probes (copy, pickle, inspect) must not import diffusers
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from dmdr_fast.models.families import FAMILY_MODULES

    for module in FAMILY_MODULES.values():
        mod = importlib.import_module(module)
        if name in getattr(mod, "__all__", ()) and name not in ("FAMILY", "random_pipeline"):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from dmdr_fast.models.attention import attention_backend, restore_attention, use_attention
    from dmdr_fast.models.dit import (
        DIT_ATTENTION_TARGETS,
        DIT_FEEDFORWARD_TARGETS,
        DIT_LORA_TARGETS,
        DiTAdapter,
        dit_from_config,
        tiny_dit,
    )

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_LORA_TARGETS",
    "LORA_WEIGHTS_NAME",
    "Condition",
    "DiTAdapter",
    "FlowModelAdapter",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "ScaleSpec",
    "attention_backend",
    "dit_from_config",
    "inject_lora",
    "load_lora",
    "lora_adapter_config",
    "lora_layers",
    "lora_parameters",
    "lora_scale",
    "lora_state_dict",
    "make_guidance",
    "make_student",
    "merge_and_unload",
    "merged_state_dict",
    "restore_attention",
    "save_lora",
    "set_lora_scale",
    "tiny_dit",
    "use_attention",
]
