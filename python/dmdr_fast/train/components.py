"""Config sections → the library objects a run uses: schedules, the CFG scale, LoRA configs.

The config (:mod:`dmdr_fast.config`) is data and validation only; this is the one place where its
numbers become :mod:`dmdr_fast.algo` and :mod:`dmdr_fast.models` objects.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmdr_fast.algo import DynaDG, DynaRS, GuidanceScale
from dmdr_fast.config import ConfigError, DMDRConfig, LoraSpec
from dmdr_fast.models.lora import LoraConfig

__all__ = ["guidance_scale", "lora_config", "real_score_schedule", "renoise_schedule"]


def renoise_schedule(dmdr: DMDRConfig) -> DynaRS:
    """The critic's and the DMD renoise-time law (DynaRS, or uniform), docs/method.md §4."""
    return DynaRS(
        horizon=dmdr.dynamic_horizon,
        a=dmdr.dynars_a,
        b=dmdr.dynars_b,
        mode=dmdr.renoise,
        t_min=dmdr.renoise_t_min,
    )


def real_score_schedule(dmdr: DMDRConfig) -> DynaDG:
    """The real score's LoRA-scale schedule λ_r(s) (DynaDG), docs/method.md §4."""
    return DynaDG(scale0=dmdr.real_scale0, horizon=dmdr.dynamic_horizon)


def guidance_scale(dmdr: DMDRConfig) -> GuidanceScale:
    """The real score's CFG scale with its per-batch jitter, docs/method.md §6."""
    return GuidanceScale(scale=dmdr.guidance, jitter=dmdr.guidance_jitter)


def lora_config(spec: LoraSpec, adapter: str = "default", default_targets: Sequence[str] = ()) -> LoraConfig:
    """The :class:`~dmdr_fast.models.lora.LoraConfig` to inject for a config's LoRA section.

    Args:
        spec: The config's LoRA section (rank, alpha, init, targets).
        adapter: Adapter name (a Python identifier), e.g. ``"student"`` or ``"critic"``.
        default_targets: The model family's targets, used when ``spec.targets`` is empty.

    Raises:
        ConfigError: If both ``spec.targets`` and ``default_targets`` are empty.
    """
    targets = spec.targets or tuple(default_targets)
    if not targets:
        raise ConfigError(
            "is empty and the model family gives no default targets; list module-name patterns",
            field="targets",
            owner=type(spec).__name__,
        )
    return LoraConfig(targets=targets, rank=spec.rank, alpha=spec.alpha, init=spec.init, adapter=adapter)
