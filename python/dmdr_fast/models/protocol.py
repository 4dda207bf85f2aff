"""The model-adapter protocol: every model family looks the same to the DMDR algorithm.

An adapter wraps one network (a diffusers transformer or UNet plus whatever it needs to be called)
and exposes it in the flow-matching convention of DESIGN §1:

    x_t = (1 − t)·x0 + t·ε,   t ∈ [0, 1],   t = 1 is pure noise,   v ≈ ε − x0.

Everything model-specific (timestep scaling, ε- or x0-prediction conversion, learned-sigma output
channels, how conditions are embedded, the VAE) stays inside the adapter; the algorithm only sees
tensors of shape ``(B, *sample_shape)``, times of shape ``(B,)`` and opaque *conditions*.

Conditions are opaque to the algorithm but must be batchable: the generator update evaluates the
fake, conditional and unconditional scores in ONE forward of size 3B, which needs
``cat_conditions([c, c, null])`` and, for the outputs, ``slice_condition``. The generic helpers
below handle the common containers (tensors, dicts, tuples, lists, dataclasses, ``None``); an
adapter whose conditions need more (for example padding text embeddings of different lengths)
implements its own methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Condition",
    "FlowModelAdapter",
    "cat_conditions",
    "check_time",
    "condition_batch_size",
    "slice_condition",
]

#: A batch of conditions. Class-conditional models use a ``(B,)`` int64 tensor of labels;
#: text-to-image models use a mapping or dataclass of tensors whose first dimension is B.
Condition: TypeAlias = Any


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
            cond: Conditions for the B samples (from :meth:`encode_condition`,
                :meth:`null_condition` or :meth:`cat_conditions`).

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

    def cat_conditions(self, conds: Sequence[Condition]) -> Condition:
        """Concatenate condition batches along the batch dimension (B1 + B2 + ...)."""
        ...

    def slice_condition(self, cond: Condition, start: int, stop: int) -> Condition:
        """The samples ``start:stop`` of a condition batch."""
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


def cat_conditions(conds: Sequence[Condition]) -> Condition:
    """Concatenate condition batches along dim 0, recursing into common containers.

    Tensors are concatenated with ``torch.cat``; mappings, tuples, lists and dataclasses are
    concatenated field by field; ``None`` stays ``None`` (all entries must then be ``None``).

    Args:
        conds: Condition batches of the same structure, batch sizes ``B_1, ..., B_k``.

    Returns:
        One condition batch of size ``B_1 + ... + B_k``.

    Raises:
        ValueError: If ``conds`` is empty or its entries differ in structure.
        TypeError: If a leaf is neither a tensor nor ``None``.
    """
    if len(conds) == 0:
        raise ValueError("cat_conditions needs at least one condition batch, got none")
    first = conds[0]
    if first is None:
        if any(c is not None for c in conds):
            raise ValueError("cat_conditions: cannot mix None with non-None conditions")
        return None
    if isinstance(first, torch.Tensor):
        _check_all(conds, torch.Tensor)
        return torch.cat(list(conds), dim=0)
    if isinstance(first, Mapping):
        _check_all(conds, Mapping)
        keys = list(first.keys())
        if any(list(c.keys()) != keys for c in conds):
            raise ValueError("cat_conditions: mappings have different keys")
        return type(first)({k: cat_conditions([c[k] for c in conds]) for k in keys})
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        _check_all(conds, type(first))
        fields = {
            f.name: cat_conditions([getattr(c, f.name) for c in conds]) for f in dataclasses.fields(first)
        }
        return dataclasses.replace(first, **fields)
    if isinstance(first, (tuple, list)):
        _check_all(conds, (tuple, list))
        if any(len(c) != len(first) for c in conds):
            raise ValueError("cat_conditions: sequences have different lengths")
        return type(first)(cat_conditions([c[i] for c in conds]) for i in range(len(first)))
    raise TypeError(f"cat_conditions: unsupported condition leaf of type {type(first).__name__}")


def slice_condition(cond: Condition, start: int, stop: int) -> Condition:
    """Take the samples ``start:stop`` (dim 0) of a condition batch, recursing into containers.

    Args:
        cond: A condition batch (tensor, mapping, tuple, list, dataclass or ``None``).
        start: First sample index.
        stop: One past the last sample index.

    Returns:
        A condition batch of size ``stop − start`` with the same structure; tensors are views.
    """
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[start:stop]
    if isinstance(cond, Mapping):
        return type(cond)({k: slice_condition(v, start, stop) for k, v in cond.items()})
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        fields = {
            f.name: slice_condition(getattr(cond, f.name), start, stop) for f in dataclasses.fields(cond)
        }
        return dataclasses.replace(cond, **fields)
    if isinstance(cond, (tuple, list)):
        return type(cond)(slice_condition(c, start, stop) for c in cond)
    raise TypeError(f"slice_condition: unsupported condition leaf of type {type(cond).__name__}")


def condition_batch_size(cond: Condition) -> int | None:
    """Batch size of a condition batch: dim 0 of its first tensor leaf, ``None`` if it has none."""
    if isinstance(cond, torch.Tensor):
        return int(cond.shape[0]) if cond.dim() > 0 else None
    if isinstance(cond, Mapping):
        leaves: Any = cond.values()
    elif dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        leaves = (getattr(cond, f.name) for f in dataclasses.fields(cond))
    elif isinstance(cond, (tuple, list)):
        leaves = cond
    else:
        return None
    for leaf in leaves:
        size = condition_batch_size(leaf)
        if size is not None:
            return size
    return None


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


def _check_all(conds: Sequence[Condition], kind: type | tuple[type, ...]) -> None:
    bad = [type(c).__name__ for c in conds if not isinstance(c, kind)]
    if bad:
        raise ValueError(f"cat_conditions: entries differ in structure (unexpected types {sorted(set(bad))})")
