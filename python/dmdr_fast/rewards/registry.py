"""Build rewards by kind name (from configs / the CLI): ``build_reward("pickscore", path=..., weight=...)``.

Each kind maps to a *builder*: a function called as ``builder(*, path, spec, device, dtype,
**kwargs)`` — ``spec`` the reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (built by
:func:`build_reward`, to be passed whole to the reward class), ``kwargs`` the kind-specific
arguments — and returning a :class:`~dmdr_fast.rewards.base.Reward`.

Adding a kind (e.g. ``"hps"`` or ``"image_reward"``): write a builder taking those keywords (in the
reward's module or here) and either add it to ``_BUILDERS`` below — with its download source in
``_SOURCES`` if it loads weights — (built-in kinds, listed in :data:`REWARD_KINDS`), or call
``register_reward_kind(kind, builder, source=...)`` at run time (listed by
:func:`available_reward_kinds`). For kinds with a source, :func:`build_reward` turns a missing
``path`` into a :class:`MissingWeightsError` naming what to download, so builders always get a path.

Reward models are frozen (``requires_grad_(False)``, eval); ``dtype`` (e.g. ``torch.bfloat16``)
casts the model only, scores stay float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dmdr_fast.rewards.aesthetic import AESTHETIC_MLP_URL, AestheticReward
from dmdr_fast.rewards.base import Reward
from dmdr_fast.rewards.callable import CallableReward
from dmdr_fast.rewards.clip import (
    CLIP_HUB_ID,
    PICKSCORE_HUB_ID,
    PICKSCORE_PROCESSOR_HUB_ID,
    CLIPScoreReward,
    PickScoreReward,
)
from dmdr_fast.rewards.hps import HPS_SOURCE, HPS_TOKENIZER_SOURCE, build_hps
from dmdr_fast.rewards.image_reward import BERT_TOKENIZER_SOURCE, IMAGE_REWARD_SOURCE, build_image_reward
from dmdr_fast.rewards.ink import InkReward
from dmdr_fast.rewards.jpeg import JpegReward
from dmdr_fast.rewards.loading import MissingWeightsError, as_dtype
from dmdr_fast.rewards.spec import RewardSpec, spec_fields

__all__ = [
    "REWARD_KINDS",
    "RewardBuilder",
    "as_dtype",
    "available_reward_kinds",
    "build_reward",
    "register_reward_kind",
    "require_path",
    "resolve_callable",
    "reward_from_config",
    "rewards_from_config",
]

#: ``builder(*, path, spec, device, dtype, **kwargs) -> Reward``.
RewardBuilder = Callable[..., Reward]

PathLike = str | os.PathLike[str]


def require_path(path: PathLike | None, *, kind: str, source: str) -> PathLike:
    """Return ``path``, or raise :class:`MissingWeightsError` naming what to download for ``kind``.

    Args:
        path: The ``path`` given to :func:`build_reward`.
        kind: The reward kind, for the message.
        source: Hub id or URL of the weights (and anything else needed), for the message.
    """
    if path is None:
        raise MissingWeightsError(
            f"reward kind {kind!r} needs path= a local copy of {source} (download it on a machine with "
            f"internet, e.g. `huggingface-cli download {source.split()[0]} --local-dir DIR`), or the hub "
            f"id itself when this machine is online"
        )
    return path


def _build_clip(
    *,
    path: PathLike | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    **kwargs: Any,
) -> Reward:
    """``kwargs``: reward arguments plus ``tokenizer_path``, ``scale``, ``crop``, ``text_cache_size``."""
    assert path is not None  # build_reward checked it (the kind declares a source)
    return CLIPScoreReward.from_pretrained(path, device=device, dtype=dtype, **kwargs)


def _build_pickscore(
    *,
    path: PathLike | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    **kwargs: Any,
) -> Reward:
    """``kwargs``: as ``"clip"``; ``tokenizer_path`` defaults to the processor's repository for hub ids."""
    assert path is not None
    return PickScoreReward.from_pretrained(path, device=device, dtype=dtype, **kwargs)


def _build_aesthetic(
    *,
    path: PathLike | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    **kwargs: Any,
) -> Reward:
    """``path``: the CLIP ViT-L/14 folder; ``kwargs``: reward arguments plus ``mlp_path``, ``crop``."""
    assert path is not None
    return AestheticReward.from_pretrained(path, device=device, dtype=dtype, **kwargs)


def _build_callable(
    *,
    path: PathLike | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    fn: Any = None,
    **kwargs: Any,
) -> Reward:
    """``fn``: the scorer (required), or ``"module:function"`` (from YAML); ``kwargs``:
    :class:`CallableReward` arguments (``spec``, ...)."""
    if fn is None:
        raise ValueError("reward kind 'callable' needs fn=, a function fn(images, cond) -> (B,)")
    if isinstance(fn, str):
        fn = resolve_callable(fn)
    if path is not None:
        raise ValueError("reward kind 'callable' takes no path (it wraps fn)")
    if dtype is not None and not isinstance(fn, nn.Module):
        raise ValueError("reward kind 'callable': dtype only applies when fn is an nn.Module")
    if dtype is not None:
        fn.to(dtype=dtype)
    reward = CallableReward(fn, **kwargs)
    return reward if device is None else reward.to(device)


def _build_jpeg(
    *,
    path: PathLike | None,
    spec: RewardSpec,
    device: Any,
    dtype: Any,
    direction: str = "compressibility",
    quality: int = 95,
) -> Reward:
    """JPEG compressibility / incompressibility (no weights, no gradient; docs/method.md §12)."""
    if path is not None:
        raise ValueError("reward kind 'jpeg' takes no path")
    return JpegReward(direction, quality=quality, spec=spec)  # type: ignore[arg-type]


def resolve_callable(target: str) -> Callable[..., Any]:
    """The object named by ``"package.module:attribute"`` (imports the module: it is the user's code).

    Raises:
        ValueError: ``target`` is not ``module:attribute``, the module or attribute does not exist,
            or the object is not callable.
    """
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a callable reward's fn must be 'module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of reward fn {target!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward fn {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward fn {target!r} is not callable")
    return obj


def _build_ink(
    *, path: PathLike | None, spec: RewardSpec, device: Any, dtype: Any, threshold: float = 0.5
) -> Reward:
    """Ink coverage (fraction of pixels brighter than ``threshold``; no weights, no gradient)."""
    if path is not None:
        raise ValueError("reward kind 'ink' takes no path")
    return InkReward(threshold, spec=spec)


_BUILDERS: dict[str, RewardBuilder] = {
    "clip": _build_clip,
    "pickscore": _build_pickscore,
    "aesthetic": _build_aesthetic,
    "callable": _build_callable,
    "hps": build_hps,
    "image_reward": build_image_reward,
    "jpeg": _build_jpeg,
    "ink": _build_ink,
}
# Kinds that need weights: where to get them, for the error when ``path`` is missing.
_SOURCES: dict[str, str] = {
    "clip": CLIP_HUB_ID,
    "pickscore": f"{PICKSCORE_HUB_ID} (tokenizer: {PICKSCORE_PROCESSOR_HUB_ID}, pass tokenizer_path=)",
    "aesthetic": f"{CLIP_HUB_ID} (and the head {AESTHETIC_MLP_URL}, pass mlp_path=)",
    "hps": f"{HPS_SOURCE} (HPS_v2.1_compressed.pt; tokenizer: {HPS_TOKENIZER_SOURCE})",
    "image_reward": f"{IMAGE_REWARD_SOURCE} (ImageReward.pt, med_config.json; tokenizer: {BERT_TOKENIZER_SOURCE})",
}

#: The built-in reward kinds (kinds added with :func:`register_reward_kind` are listed by
#: :func:`available_reward_kinds`).
REWARD_KINDS: tuple[str, ...] = tuple(_BUILDERS)


def available_reward_kinds() -> tuple[str, ...]:
    """All kinds :func:`build_reward` accepts now, built-in and registered."""
    return tuple(_BUILDERS)


def register_reward_kind(
    kind: str, builder: RewardBuilder, *, source: str | None = None, overwrite: bool = False
) -> None:
    """Make ``build_reward(kind, ...)`` call ``builder``.

    Args:
        kind: The name used in configs.
        builder: ``builder(*, path, spec, device, dtype, **kwargs) -> Reward``; ``spec`` is the
            reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`, ``dtype`` a ``torch.dtype`` or
            ``None``.
        source: For kinds that load weights: where they are published (hub id or URL). Then
            ``build_reward`` refuses ``path=None`` with a :class:`MissingWeightsError` naming it,
            before calling ``builder``.
        overwrite: Replace an existing kind (otherwise that is an error).

    Raises:
        ValueError: ``kind`` is empty or already registered (without ``overwrite``).
        TypeError: ``builder`` is not callable.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    if kind in _BUILDERS and not overwrite:
        raise ValueError(f"reward kind {kind!r} is already registered; pass overwrite=True to replace it")
    _BUILDERS[kind] = builder
    if source is None:
        _SOURCES.pop(kind, None)
    else:
        _SOURCES[kind] = source


def build_reward(
    kind: str,
    *,
    path: PathLike | None = None,
    spec: RewardSpec | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> Reward:
    """Build a frozen reward of a given kind.

    Args:
        kind: One of :func:`available_reward_kinds` (built-in: :data:`REWARD_KINDS`).
        path: Local weights (folder/file) or, online, a hub id; required by model-based kinds.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`. Instead of it, its fields
            may be given as keywords — ``name`` (default: ``kind``), ``weight``, ``loss_form``
            (``"neg"`` or ``"hinge"``), ``margin`` (score units; paper: 0.7 for CLIP cosine),
            ``prompt_prefix`` — but not both.
        device: Move the reward model there.
        dtype: Cast the reward model: a ``torch.dtype`` or a name from a config (``"bfloat16"``,
            ``"bf16"``, ``"float16"``, ``"fp16"``, ``"float32"``, ``"fp32"``); scores stay float32.
        **kwargs: The spec's fields (above), and kind-specific arguments: ``tokenizer_path``,
            ``scale``, ``crop``, ``text_cache_size`` (``"clip"``, ``"pickscore"``); ``mlp_path``
            (``"aesthetic"``); ``fn``, ``differentiable``, ``cond_kind``, ``channels``
            (``"callable"``).

    Returns:
        The :class:`Reward`.

    Raises:
        ValueError: Unknown ``kind`` (lists the kinds) or ``dtype``; a bad spec field (names it).
        TypeError: Both ``spec`` and some of its fields as keywords.
        MissingWeightsError: ``path`` is missing or does not hold the weights (names the download).
        ImportError: An optional dependency is missing (names the pip extra).
    """
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise ValueError(
            f"unknown reward kind {kind!r}; available kinds: {', '.join(available_reward_kinds())}"
        )
    if spec is None:
        spec, kwargs = RewardSpec.split(kwargs, default_name=kind)
    elif both := [k for k in kwargs if k in spec_fields()]:
        raise TypeError(
            f"build_reward({kind!r}): pass spec= or its fields as keywords, not both (got {both})"
        )
    if kind in _SOURCES:
        path = require_path(path, kind=kind, source=_SOURCES[kind])
    reward = builder(path=path, spec=spec, device=device, dtype=as_dtype(dtype), **kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"builder of reward kind {kind!r} returned {type(reward).__name__}, not a Reward")
    return reward


def reward_from_config(config: Any, *, device: torch.device | str | None = None, dtype: Any = None) -> Reward:
    """Build the reward of one :class:`~dmdr_fast.config.RewardConfig` entry.

    The entry's spec fields (``name`` or else ``kind``, ``weight``, ``form``, ``margin``,
    ``prompt_prefix``) become the reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`
    (:meth:`RewardSpec.from_config <dmdr_fast.rewards.spec.RewardSpec.from_config>`); ``kind``,
    ``path`` and ``kwargs`` go to :func:`build_reward`. The combination policy (``combine``,
    ``ratio``, ``max_weight``) is not the reward's: the Trainer reads it from the same entry. The
    ``classifier`` kind wraps a model the caller owns (a preset trains it), so it is not built here.

    Raises:
        ValueError: ``kind`` is ``classifier`` or ``none``, or unknown.
    """
    if config.kind in ("classifier", "none"):
        raise ValueError(
            f"reward kind {config.kind!r} cannot be built from a config alone: pass a "
            "dmdr_fast.rewards.ClassifierReward built on your classifier (a preset does this)"
        )
    return build_reward(
        config.kind,
        path=config.path,
        spec=RewardSpec.from_config(config),
        device=device,
        dtype=dtype,
        **dict(config.kwargs),
    )


def rewards_from_config(configs: Any, *, device: torch.device | str | None = None, dtype: Any = None):
    """A :class:`~dmdr_fast.rewards.CompositeReward` of the active entries of ``config.rewards`` (or None)."""
    from dmdr_fast.rewards.base import CompositeReward

    active = [c for c in configs if c.active]
    if not active:
        return None
    return CompositeReward([reward_from_config(c, device=device, dtype=dtype) for c in active])
