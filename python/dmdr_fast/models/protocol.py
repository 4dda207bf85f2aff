"""The model-adapter protocol: every model family looks the same to the DMDR algorithm.

An adapter wraps one network (a diffusers transformer or UNet plus whatever it needs to be called)
and exposes it in the flow-matching convention of docs/method.md §1:

    x_t = (1 − t)·x0 + t·ε,   t ∈ [0, 1],   t = 1 is pure noise,   v ≈ ε − x0.

Everything model-specific (timestep scaling, ε- or x0-prediction conversion, learned-sigma output
channels, how conditions are embedded, the VAE) stays inside the adapter; the algorithm only sees
tensors of shape ``(B, *sample_shape)``, times of shape ``(B,)`` and opaque *conditions*.

Conditions are opaque to the algorithm but must be batchable: the generator update evaluates the
fake, conditional and unconditional scores in ONE forward of size 3B. Batching is done by
:mod:`dmdr_fast.conditions` (tensors, dicts, tuples, lists, dataclasses, shared leaves such as
``None``) for every family, so an adapter's conditions only have to be such trees of tensors.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from torch import nn

from dmdr_fast.conditions import Cond

__all__ = ["Condition", "FlowModelAdapter", "check_time"]

#: A batch of conditions. Class-conditional models use a ``(B,)`` int64 tensor of labels;
#: text-to-image models use a dataclass of tensors whose first dimension is B.
Condition: TypeAlias = Cond


@runtime_checkable
class FlowModelAdapter(Protocol):
    """What every model family implements (DiT here; SD3, Flux, Z-Image, SDXL later).

    ``isinstance(obj, FlowModelAdapter)`` only checks that the members exist; the contract on
    shapes and semantics is the one documented here and is checked by the conformance tests.
    """

    @property
    def network(self) -> nn.Module:
        """The wrapped trainable network: where LoRA is injected, what an optimizer sees."""
        ...

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the network works in, e.g. ``(C, H, W)``."""
        ...

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Predict the flow-matching velocity ``v ≈ ε − x0`` at ``x_t``.

        Args:
            x_t: Noisy samples, shape ``(B, *sample_shape)``.
            t: Times in ``[0, 1]`` (1 = noise), shape ``(B,)``, floating point.
            cond: Conditions for the B samples (from :meth:`encode_condition` or
                :meth:`null_condition`, possibly batched with :mod:`dmdr_fast.conditions`).

        Returns:
            Velocity, shape ``(B, *sample_shape)``, in the dtype of ``x_t``.
        """
        ...

    def encode_condition(self, raw: Any) -> Condition:
        """Turn raw conditions (class labels now, prompts later) into a batch of conditions."""
        ...

    def null_condition(self, batch_size: int) -> Condition:
        """The unconditional ("∅") condition used for classifier-free guidance, for a batch."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Map samples to images in ``[0, 1]`` for rewards and evaluation, differentiably.

        Args:
            x: Samples, shape ``(B, *sample_shape)``.

        Returns:
            Images, shape ``(B, C_img, H_img, W_img)`` with values in ``[0, 1]`` (C_img is 3 for
            RGB models, 1 for grayscale ones such as the digits preset).
        """
        ...


def check_time(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` as a ``(batch,)`` floating tensor on ``device`` (a scalar is broadcast).

    Raises:
        ValueError: If ``t`` is not floating point or has the wrong shape.
    """
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        raise ValueError(f"t must be floating point in [0, 1], got dtype {t.dtype}")
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) to match x_t, got {tuple(t.shape)}")
    return t
