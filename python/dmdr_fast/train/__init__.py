"""Training: the DMDR Trainer (state and order of an iteration), checkpoints, logging, the monitor."""

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.data.samplers import ClassLabelSampler, ConditionSampler
from dmdr_fast.train.runtime import deterministic_algorithms, resolve_device
from dmdr_fast.train.trainer import Trainer, TrainerState

__all__ = [
    "ClassLabelSampler",
    "ConditionSampler",
    "DMDRTrainerConfig",
    "Trainer",
    "TrainerState",
    "deterministic_algorithms",
    "resolve_device",
]
