"""Conditions as trees of tensors: the one home of the rules for batching them.

The algorithm and the trainer never look inside a condition: they only need to *select samples*
from it (the backward simulation evaluates the generator on a shrinking subset of the batch, the
samplers and caches take rows), *concatenate* it (the guidance network runs fake / conditional /
unconditional passes as one batch), *broadcast* a batch-1 null condition to the batch size and
*move* it to a device. Model adapters, the prompt cache and the trainer all use these functions;
an adapter implements none of this itself. A condition is any nesting of:

* ``torch.Tensor`` with at least one dimension: batched data, dimension 0 is the sample index;
* ``tuple`` / ``list`` (named tuples included), ``dict`` and dataclass instances (the text-to-image
  adapters' condition classes): containers, rebuilt with the same type;
* ``None``, strings, numbers and 0-dim tensors: *shared* leaves, passed through unchanged. When
  conditions are concatenated their shared leaves must be equal, otherwise the result would be
  ambiguous and an error is raised.

Per-sample data that is not a tensor (for example a list of prompt strings) is not supported here:
adapters encode it to tensors first (``encode_condition``). The module sits at the bottom of the
package (it imports only torch), so that models, data, algo and train can all share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch

from dmdr_fast._device import host_to_device

__all__ = [
    "Cond",
    "cat_conds",
    "cond_batch_size",
    "expand_cond",
    "index_cond",
    "map_tensors",
    "slice_cond",
    "to_device",
]

Cond: TypeAlias = Any
"""Whatever the model adapter takes as a condition (see the module docstring for the rules)."""


def _is_batched(leaf: object) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() >= 1


def _rebuild(container: Any, items: list[Any]) -> Any:
    """Rebuild a tuple / named tuple / list with new items, keeping its type."""
    if isinstance(container, tuple) and hasattr(container, "_fields"):
        return type(container)(*items)
    return type(container)(items)


def _rebuild_mapping(mapping: Any, items: dict[Any, Any]) -> Any:
    """Rebuild a mapping (dict, OrderedDict, ...) with new items, keeping its type."""
    return type(mapping)(items)


def _is_dataclass(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Apply ``fn`` to every batched tensor leaf, keeping the structure."""
    if _is_batched(cond):
        return fn(cond)
    if _is_dataclass(cond):  # text-to-image adapters' condition classes
        return dataclasses.replace(cond, **{k: _map(fn, v) for k, v in _fields(cond).items()})
    if isinstance(cond, Mapping):
        return _rebuild_mapping(cond, {key: _map(fn, value) for key, value in cond.items()})
    if isinstance(cond, (tuple, list)):
        return _rebuild(cond, [_map(fn, item) for item in cond])
    return cond


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Apply ``fn`` to every tensor leaf, batched or not (e.g. ``lambda v: v.to(device)``).

    Args:
        fn: Tensor → tensor.
        cond: A condition: a tensor, mapping, tuple/list, dataclass, or a shared non-tensor leaf.

    Returns:
        The condition with the same structure.
    """
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    if _is_dataclass(cond):
        return dataclasses.replace(cond, **{k: map_tensors(fn, v) for k, v in _fields(cond).items()})
    if isinstance(cond, Mapping):
        return _rebuild_mapping(cond, {key: map_tensors(fn, value) for key, value in cond.items()})
    if isinstance(cond, (tuple, list)):
        return _rebuild(cond, [map_tensors(fn, item) for item in cond])
    return cond


def _batch_sizes(cond: Cond, out: set[int]) -> set[int]:
    if _is_batched(cond):
        out.add(int(cond.shape[0]))
    elif isinstance(cond, Mapping):
        for value in cond.values():
            _batch_sizes(value, out)
    elif _is_dataclass(cond):
        for value in _fields(cond).values():
            _batch_sizes(value, out)
    elif isinstance(cond, (tuple, list)):
        for item in cond:
            _batch_sizes(item, out)
    return out


def cond_batch_size(cond: Cond) -> int | None:
    """Batch size of a condition: the common size of dim 0 of its batched tensors.

    Args:
        cond: a condition (see the module docstring).

    Returns:
        The batch size, or None if the condition holds no batched tensor (e.g. ``None``).

    Raises:
        ValueError: if the batched tensors disagree on their first dimension.
    """
    sizes = _batch_sizes(cond, set())
    if len(sizes) > 1:
        raise ValueError(f"cond has batched tensors with different leading sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """Select samples of a condition along dimension 0.

    Args:
        cond: a condition with batch size B (or no batched tensor at all).
        index: (M,) int64 indices into ``[0, B)`` or (B,) bool mask.

    Returns:
        The condition restricted to the selected samples; shared leaves are passed through.
    """
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise TypeError("index must be a 1-D tensor of indices or a boolean mask")
    return _map(lambda x: x[index.to(x.device)], cond)


def slice_cond(cond: Cond, start: int, stop: int) -> Cond:
    """The samples ``start:stop`` of a condition (views of its batched tensors).

    Args:
        cond: a condition with batch size B (or no batched tensor at all).
        start: first sample index.
        stop: one past the last sample index.

    Returns:
        The condition restricted to those samples; shared leaves are passed through.
    """
    return _map(lambda x: x[start:stop], cond)


def expand_cond(cond: Cond, batch_size: int) -> Cond:
    """Broadcast a batch-1 condition to ``batch_size`` samples (a view, no copy).

    Conditions that already have ``batch_size`` samples, or no batched tensor, are returned
    unchanged. This exists because adapters often produce one null condition for the whole batch.

    Args:
        cond: a condition of batch size 1 or ``batch_size``.
        batch_size: the target batch size B.

    Returns:
        The condition with every batched tensor of leading size ``batch_size``.

    Raises:
        ValueError: if the condition's batch size is neither 1 nor ``batch_size``.
    """
    size = cond_batch_size(cond)
    if size is None or size == batch_size:
        return cond
    if size != 1:
        raise ValueError(f"cond has batch size {size}; expected 1 (broadcast) or {batch_size}")
    return _map(lambda x: x.expand(batch_size, *x.shape[1:]), cond)


def _shared_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


def _cat(parts: list[Any], path: str) -> Any:
    first = parts[0]
    batched = [_is_batched(p) for p in parts]
    if any(batched):
        if not all(batched):
            raise ValueError(f"cannot concatenate conditions: {path} is a batched tensor in some parts only")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:  # a clear error instead of torch.cat's
            raise ValueError(f"cannot concatenate conditions: {path} has per-sample shapes {sorted(shapes)}")
        return torch.cat(parts, dim=0)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        if not all(isinstance(p, Mapping) and list(p.keys()) == keys for p in parts):
            raise ValueError(f"cannot concatenate conditions: dicts at {path} have different keys")
        return _rebuild_mapping(first, {k: _cat([p[k] for p in parts], f"{path}[{k!r}]") for k in keys})
    if _is_dataclass(first):
        if not all(type(p) is type(first) for p in parts):
            raise ValueError(f"cannot concatenate conditions: {path} mixes condition classes")
        names = list(_fields(first))
        return dataclasses.replace(
            first, **{k: _cat([getattr(p, k) for p in parts], f"{path}.{k}") for k in names}
        )
    if isinstance(first, (tuple, list)):
        if not all(type(p) is type(first) and len(p) == len(first) for p in parts):
            raise ValueError(f"cannot concatenate conditions: sequences at {path} differ in type or length")
        items = [_cat([p[i] for p in parts], f"{path}[{i}]") for i in range(len(first))]
        return _rebuild(first, items)
    if not all(_shared_equal(first, p) for p in parts[1:]):
        raise ValueError(
            f"cannot concatenate conditions: the shared (non-batched) leaf at {path} differs between parts"
        )
    return first


def cat_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditions along dimension 0 (e.g. ``[cond, cond, null_cond]`` → 3B samples).

    Args:
        conds: conditions with the same structure; batched tensors are concatenated, shared leaves
            must be equal in every part and are kept once.

    Returns:
        The concatenated condition (``None`` if every part is ``None``).

    Raises:
        ValueError: if ``conds`` is empty or the parts do not have the same structure.
    """
    parts = list(conds)
    if not parts:
        raise ValueError("conds must contain at least one condition")
    return _cat(parts, "cond")


def to_device(cond: Cond, device: torch.device | str) -> Cond:
    """Move every tensor of a condition to ``device`` (from pageable CPU memory without a stall:
    :func:`dmdr_fast._device.host_to_device`)."""
    return map_tensors(lambda v: host_to_device(v, device), cond)
