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
  :mod:`~dmdr_fast.models.sdxl` — SD3/SD3.5, Flux, Z-Image and SDXL (ε → flow) pipelines.
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
_LAZY_T2I = {
    "TextToImageAdapter": "t2i",
    "SD3Adapter": "sd3",
    "SD3Condition": "sd3",
    "SD3_LORA_TARGETS": "sd3",
    "FluxAdapter": "flux",
    "FluxCondition": "flux",
    "FLUX_LORA_TARGETS": "flux",
    "ZImageAdapter": "zimage",
    "ZImageCondition": "zimage",
    "ZIMAGE_LORA_TARGETS": "zimage",
    "SDXLAdapter": "sdxl",
    "SDXLCondition": "sdxl",
    "SDXL_LORA_TARGETS": "sdxl",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_DIT:
        from dmdr_fast.models import dit

        return getattr(dit, name)
    if name in _LAZY_ATTENTION:
        from dmdr_fast.models import attention

        return getattr(attention, name)
    if name in _LAZY_T2I:
        import importlib

        return getattr(importlib.import_module(f"dmdr_fast.models.{_LAZY_T2I[name]}"), name)
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
    from dmdr_fast.models.flux import FLUX_LORA_TARGETS, FluxAdapter, FluxCondition
    from dmdr_fast.models.sd3 import SD3_LORA_TARGETS, SD3Adapter, SD3Condition
    from dmdr_fast.models.sdxl import SDXL_LORA_TARGETS, SDXLAdapter, SDXLCondition
    from dmdr_fast.models.t2i import TextToImageAdapter
    from dmdr_fast.models.zimage import ZIMAGE_LORA_TARGETS, ZImageAdapter, ZImageCondition

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_LORA_TARGETS",
    "FLUX_LORA_TARGETS",
    "LORA_WEIGHTS_NAME",
    "SD3_LORA_TARGETS",
    "SDXL_LORA_TARGETS",
    "ZIMAGE_LORA_TARGETS",
    "Condition",
    "DiTAdapter",
    "FlowModelAdapter",
    "FluxAdapter",
    "FluxCondition",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "SD3Adapter",
    "SD3Condition",
    "SDXLAdapter",
    "SDXLCondition",
    "ScaleSpec",
    "TextToImageAdapter",
    "ZImageAdapter",
    "ZImageCondition",
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
