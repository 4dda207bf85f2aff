"""Where the conditions of a training batch come from: the protocol, and uniform class labels.

DMDR needs no images, only conditions: class labels here, prompts in
:class:`~dmdr_fast.data.prompts.PromptSampler` and the prompt cache's sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["ClassLabelSampler", "ConditionSampler"]


class ConditionSampler(Protocol):
    """Where the conditions of a batch come from (DMDR needs no images: only conditions)."""

    def sample(self, batch_size: int, generator: torch.Generator) -> Any:
        """Raw conditions for ``batch_size`` samples (labels, prompts...)."""
        ...


@dataclass(frozen=True)
class ClassLabelSampler:
    """Uniform class labels in ``[0, num_classes)``."""

    num_classes: int

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch_size,)`` int64 labels drawn with ``generator``."""
        return torch.randint(self.num_classes, (batch_size,), generator=generator)
