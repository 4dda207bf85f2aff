"""The DMDR training configuration: frozen, validated dataclasses, YAML files and overrides.

The root is :class:`DMDRTrainerConfig`::

    name
    model    ModelConfig    which teacher family to build and how it maps time
    data     DataConfig     prompts and the prompt-embedding cache (text-to-image)
    student  StudentConfig  the few-step generator G (full or LoRA), N steps, shift, EMA
    critic   CriticConfig   the guidance network's trainable part ψ and the fake scale λ_f
    dmdr     DMDRConfig     the method: CFG of the real score, DynaDG/DynaRS, R, stages, weights
    optim    OptimConfig    the two AdamW optimisers (generator and critic), stage-2 LRs, clipping
    rewards  tuple[RewardConfig, ...]  reward models, weights and how they combine with DMD
    rl       RLConfig       rewards without gradients: GRPO or advantage-weighted Decoupled DMD
    monitor  MonitorConfig  the reward-hacking monitor (held-out score, diversity, cosine)
    train    TrainConfig    steps, batch, seed, precision, logging/eval/checkpoint cadence, device

Defaults follow the authors' released recipe (docs/method.md §11: the 1-step SiT-XL/2 stage 1,
20k generator steps at LR 2e-5, S = 10k, λ_r0 = 0.75, no CFG, R = 5, clip 1.0, no EMA), except the
critic's learning rate (a LoRA critic at 10× the generator's, docs/method.md §5.2) and
``dmdr.cold_start_steps = 0`` (rewards, when configured, act from the start; the paper's two-stage
run sets it to the length of stage 1). Every field carries help text
(``field(metadata={"help": ...})``); ``DMDRTrainerConfig.describe()`` lists them all::

    cfg = DMDRTrainerConfig.load_yaml("digits.yaml", overrides=["student.num_steps=4"])
    cfg.save_yaml(out_dir / "config.yaml")

All counts of "steps" are **generator updates** (the schedules' s); one generator update takes
``dmdr.ratio_update`` critic updates.

The package is data and validation only: it builds no algorithm or model objects (the Trainer
does, :mod:`dmdr_fast.train.components`). Modules: :mod:`~dmdr_fast.config.engine` (typed
construction, errors), :mod:`~dmdr_fast.config.files` (YAML, overrides, describe),
:mod:`~dmdr_fast.config.base` (the ``ConfigBase`` mixin), and the schema in
:mod:`~dmdr_fast.config.networks`, :mod:`~dmdr_fast.config.method`, :mod:`~dmdr_fast.config.run`.
"""

from dmdr_fast.config.base import ConfigBase
from dmdr_fast.config.engine import ConfigError, check_range, from_dict, require, to_dict
from dmdr_fast.config.files import (
    apply_overrides,
    describe,
    load_yaml,
    parse_override,
    read_yaml,
    replace_path,
    save_yaml,
)
from dmdr_fast.config.method import DMDRConfig, MonitorConfig, OptimConfig, RewardConfig
from dmdr_fast.config.networks import (
    MAX_STUDENT_STEPS,
    CriticConfig,
    DataConfig,
    LoraSpec,
    ModelConfig,
    StudentConfig,
)
from dmdr_fast.config.rl import RLConfig
from dmdr_fast.config.run import DMDRTrainerConfig, TrainConfig

__all__ = [
    "MAX_STUDENT_STEPS",
    "ConfigBase",
    "ConfigError",
    "CriticConfig",
    "DMDRConfig",
    "DMDRTrainerConfig",
    "DataConfig",
    "LoraSpec",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "RLConfig",
    "RewardConfig",
    "StudentConfig",
    "TrainConfig",
    "apply_overrides",
    "check_range",
    "describe",
    "from_dict",
    "load_yaml",
    "parse_override",
    "read_yaml",
    "replace_path",
    "require",
    "save_yaml",
    "to_dict",
]
