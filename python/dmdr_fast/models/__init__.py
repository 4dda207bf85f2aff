"""Model adapters (diffusers networks → the flow-matching convention) and LoRA with per-sample scales.

- :mod:`~dmdr_fast.models.protocol` — :class:`FlowModelAdapter`, the protocol every family implements.
- :mod:`~dmdr_fast.models.lora` / :mod:`~dmdr_fast.models.lora_io` — LoRA injection, per-sample
  scales, merging, and peft/diffusers-format files.
- :mod:`~dmdr_fast.models.dit` — class-conditional diffusers DiT adapter and tiny-DiT factories.
- :mod:`~dmdr_fast.models.roles` — student / guidance construction and batched multi-pass velocity.
- :mod:`~dmdr_fast.models.attention` — route diffusers attention through :func:`dmdr_fast.ops.attention`.
- :mod:`~dmdr_fast.models.sd3` — :class:`SD3Adapter` for SD3 / SD3.5 pipelines (text conditions,
  flow matching with shift, VAE decode).
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
from dmdr_fast.models.protocol import (
    Condition,
    FlowModelAdapter,
    cat_conditions,
    condition_batch_size,
    slice_condition,
)
from dmdr_fast.models.roles import batched_velocity, make_guidance, make_student

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
_LAZY_SD3 = ("SD3Adapter", "SD3Condition")


def __getattr__(name: str) -> Any:
    if name in _LAZY_DIT:
        from dmdr_fast.models import dit

        return getattr(dit, name)
    if name in _LAZY_ATTENTION:
        from dmdr_fast.models import attention

        return getattr(attention, name)
    if name in _LAZY_SD3:
        from dmdr_fast.models import sd3

        return getattr(sd3, name)
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
    from dmdr_fast.models.sd3 import SD3Adapter, SD3Condition

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
    "SD3Adapter",
    "SD3Condition",
    "ScaleSpec",
    "attention_backend",
    "batched_velocity",
    "cat_conditions",
    "condition_batch_size",
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
    "slice_condition",
    "tiny_dit",
    "use_attention",
]
