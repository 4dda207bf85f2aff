"""Shared fixtures: a tiny random class-conditional DiT (8×8 grayscale, 10 classes) on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dmdr_fast.models import DiTAdapter, lora_parameters, tiny_dit


@pytest.fixture
def teacher() -> DiTAdapter:
    """A fresh tiny DiT teacher adapter in eval mode (2 layers, 4 heads × 16)."""
    return DiTAdapter(tiny_dit(seed=0)).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t (3, 1, 8, 8), t (3,), labels (3,))`` from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 9])


def _randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def randomize_lora() -> Callable[..., None]:
    """``randomize_lora(model, std=0.1, seed=0)``: random values in every LoRA factor, B included,
    so that the LoRA changes the output (B = 0 after injection would make checks vacuous)."""
    return _randomize
