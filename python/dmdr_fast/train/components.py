"""Config sections → the library objects a run uses: schedules, the CFG scale, LoRA configs, FP8,
the reward policies.

The config (:mod:`dmdr_fast.config`) is data and validation only; this is the one place where its
numbers become :mod:`dmdr_fast.algo` and :mod:`dmdr_fast.models` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from dmdr_fast.algo import DynaDG, DynaRS, GuidanceScale
from dmdr_fast.algo.generator import RewardPolicy
from dmdr_fast.config import ConfigError, DMDRConfig, DMDRTrainerConfig, LoraSpec, ModelConfig
from dmdr_fast.models.fp8 import DEFAULT_FP8_EXCLUDE, Fp8Linear, Fp8Report, quantize_linears
from dmdr_fast.models.lora import LoraConfig
from dmdr_fast.models.protocol import FlowModelAdapter

if TYPE_CHECKING:
    from dmdr_fast.rewards import CompositeReward

__all__ = [
    "frozen_fp8",
    "guidance_scale",
    "load_student_init",
    "lora_config",
    "real_score_schedule",
    "renoise_schedule",
    "reward_policies",
    "use_attention",
]


def renoise_schedule(dmdr: DMDRConfig) -> DynaRS:
    """The critic's and the DMD renoise-time law (DynaRS, or uniform), docs/method.md §4.

    ``dmdr.dynars: false`` gives horizon 0, i.e. Beta(1, 1) from the first step: the same draws as
    ``dynars_a = dynars_b = 1`` (both give the parameters (1.0, 1.0) exactly), DynaDG unchanged.
    """
    return DynaRS(
        horizon=dmdr.dynamic_horizon if dmdr.dynars else 0,
        a=dmdr.dynars_a,
        b=dmdr.dynars_b,
        mode=dmdr.renoise,
        t_min=dmdr.renoise_t_min,
    )


def real_score_schedule(dmdr: DMDRConfig) -> DynaDG:
    """The real score's LoRA-scale schedule λ_r(s) (DynaDG), docs/method.md §4.

    ``dmdr.dynadg: false`` gives λ_r ≡ 0 (the teacher), exactly as ``real_scale0 = 0``.
    """
    return DynaDG(scale0=dmdr.real_scale0 if dmdr.dynadg else 0.0, horizon=dmdr.dynamic_horizon)


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


def frozen_fp8(model: ModelConfig, guidance: nn.Module, lora_student: nn.Module | None) -> Fp8Report | None:
    """``model.weights_dtype: fp8``: the frozen linears of the guidance network in FP8 (docs/fp8.md).

    Args:
        model: The config's model section (``fp8_exclude``, ``fp8_backward``, ``fp8_attention``).
        guidance: The teacher/guidance network (its critic LoRA, if any, already injected).
        lora_student: A LoRA student's network, whose frozen base tensors are the teacher's: it
            gets the same FP8 copies (one copy of the frozen weights, not two). ``None`` for a full
            student, which trains every weight and stays in fp32.

    Returns:
        What was quantised, or ``None`` when ``weights_dtype`` is not ``fp8``.
    """
    if model.weights_dtype != "fp8":
        return None
    exclude = DEFAULT_FP8_EXCLUDE if model.fp8_exclude is None else model.fp8_exclude
    shared: dict[int, Fp8Linear] = {}

    def quantize(network: nn.Module) -> Fp8Report:
        return quantize_linears(
            network,
            exclude=exclude,
            backward=model.fp8_backward,
            activations=model.fp8_activations,
            shared=shared,
        )

    report = quantize(guidance)
    if lora_student is not None:
        quantize(lora_student)
    if model.fp8_attention:
        from dmdr_fast.models.attention import use_fp8_attention

        use_fp8_attention(guidance)
    return report


def load_student_init(student: FlowModelAdapter, kind: str, path: str) -> None:
    """``student.init``: the student's starting weights (full state dict or LoRA, by ``kind``), read
    before the optimisers, the EMA copy and DDP's broadcast see them; a resume overwrites them."""
    if kind == "lora":
        from dmdr_fast.models.lora_io import load_lora

        prefix = getattr(student, "lora_prefix", "transformer")  # stripped only if present
        load_lora(student.network, path, adapter="student", prefix=prefix)
    else:
        from dmdr_fast.models.weights import load_network_weights

        load_network_weights(student.network, path, subfolder=getattr(student, "network_attr", None))


def reward_policies(config: DMDRTrainerConfig, reward: CompositeReward | None) -> list[RewardPolicy]:
    """How each differentiable reward joins the DMD gradient (docs/method.md §7): its
    ``config.rewards`` entry (matched by name, ``name`` or else ``kind``); a reward the config
    does not list is ``fixed`` at its own ``spec.weight``.

    Raises:
        ValueError: A ``fixed`` entry's ``weight`` is not the reward's ``spec.weight`` (the
            logged ``loss_reward`` would then differ from what trains).
    """
    if reward is None:
        return []
    entries = {r.name or r.kind: r for r in config.active_rewards}
    policies = []
    for module in reward.differentiable_rewards:
        spec = module.spec
        entry = entries.get(spec.name)
        if entry is None:
            policies.append(RewardPolicy(spec.name, "fixed", spec.weight))
            continue
        if entry.combine == "fixed" and entry.weight != spec.weight:
            raise ValueError(
                f"reward {spec.name!r}: config.rewards weight {entry.weight} differs from the reward "
                f"module's spec.weight {spec.weight}; build the reward from its config entry "
                "(RewardSpec.from_config) or make the two equal"
            )
        policies.append(RewardPolicy(spec.name, entry.combine, entry.weight, entry.ratio, entry.max_weight))
    return policies


def use_attention(networks: Sequence[nn.Module], name: str) -> None:
    """``train.attention``: route the attention of ``networks`` through :func:`dmdr_fast.ops.attention`
    with ``name`` as the backend ("native" keeps the models' own attention, "auto" lets the
    dispatcher choose)."""
    if name == "native":
        return
    from dmdr_fast.models.attention import use_attention as route

    for net in networks:
        route(net, None if name == "auto" else name)
