"""Training: the DMDR Trainer, its configuration, checkpoints and logging."""

from dmdr_fast.train.config import DMDRTrainerConfig
from dmdr_fast.train.trainer import ClassLabelSampler, ConditionSampler, Trainer, TrainerState

__all__ = ["ClassLabelSampler", "ConditionSampler", "DMDRTrainerConfig", "Trainer", "TrainerState"]
