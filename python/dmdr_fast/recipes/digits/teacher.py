"""Training the digits preset's teacher (a rectified-flow DiT) and its two classifiers, with a cache.

:func:`train_flow_teacher` is plain flow-matching training in the convention of docs/method.md §1:
``x_t = (1 − t)·x0 + t·ε``, regress ``v(x_t, t, c)`` on ``ε − x0``, with classifier-free-guidance
label dropout through the adapter's null class. :func:`get_or_train_digits_teacher` and
:func:`get_or_train_digits_classifiers` build, train and cache the digits preset's teacher and its
reward / evaluation classifiers, keyed by a hash of their (fully resolved) config, so the preset
trains them once per machine.

Cache files are written atomically (temp file in the same directory + ``os.replace``); a file that
cannot be read, is truncated, or holds another config is ignored and rewritten.

Why logit-normal times by default: the teacher gets a few minutes of CPU. Uniform ``t`` spends
much of that budget near ``t ≈ 0`` (almost clean input: the target ``ε − x0`` is dominated by the
unpredictable noise and barely depends on the model) and ``t ≈ 1`` (pure noise: the answer is the
class mean). The logit-normal density ``t = sigmoid(n)``, ``n ~ N(m, s²)`` (SD3's choice) puts the
training signal on intermediate times where a digit's shape is decided. Measured on the digits
(4-block width-64 DiT, 3000 steps, 50-step Euler, 1000 samples, evaluation-network FD against all
digits; the real-vs-real floor between two stratified halves is 2.2): logit-normal FD 4.5 vs uniform
5.5 at lr 1e-3; the default (lr 3e-3) reaches FD 2.0–2.5, i.e. the floor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr_fast._io import atomic_save, load_torch_file
from dmdr_fast.algo.flow import renoise, velocity_target
from dmdr_fast.models.dit import DIGITS_DIT
from dmdr_fast.recipes.digits.classifier import DigitClassifier, DigitClassifierConfig, train_classifier

__all__ = [
    "DEFAULT_DIGITS_CLASSIFIERS_CONFIG",
    "DEFAULT_DIGITS_TEACHER_CONFIG",
    "TIME_SAMPLINGS",
    "cached_digits_teacher",
    "classifiers_cache_path",
    "config_hash",
    "get_or_train_digits_classifiers",
    "get_or_train_digits_teacher",
    "resolve_config",
    "sample_flow_times",
    "train_flow_teacher",
]

TimeSampling = Literal["logit_normal", "uniform"]
#: Time distributions of :func:`sample_flow_times`.
TIME_SAMPLINGS: tuple[str, ...] = ("logit_normal", "uniform")

_TEACHER_FORMAT = "dmdr_fast.digits_teacher/1"
_CLASSIFIERS_FORMAT = "dmdr_fast.digits_classifiers/1"

#: The digits teacher: a 4-block DiT of width 64 (4 heads × 16) on 2×2 patches (16 tokens, 0.39 M
#: parameters), 3000 AdamW steps of 128 at lr 3e-3: about 4 minutes on two (shared) CPU cores; set
#: ``train.steps`` to 2000 for ~2.5 minutes at a somewhat higher Fréchet distance. ``model`` holds
#: :func:`dit_from_config` arguments, ``train`` the keyword arguments of :func:`train_flow_teacher`,
#: ``init_seed`` the weight-initialisation seed.
DEFAULT_DIGITS_TEACHER_CONFIG: dict[str, Any] = {
    "model": dict(DIGITS_DIT),
    "init_seed": 0,
    "train": {
        "steps": 3000,
        "batch_size": 128,
        "lr": 3e-3,
        "label_dropout": 0.1,
        "seed": 0,
        "ema_decay": 0.999,
        "time_sampling": "logit_normal",
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
    },
}

#: The digits classifiers: reward and evaluation networks on disjoint stratified splits
#: (:func:`dmdr_fast.recipes.digits.data_splits`), differently seeded and of different widths.
DEFAULT_DIGITS_CLASSIFIERS_CONFIG: dict[str, Any] = {
    "split_seed": 0,
    "reward_fraction": 0.5,
    "reward": {"width": 32, "feature_dim": 64, "seed": 1, "epochs": 30, "lr": 3e-3},
    "eval": {"width": 48, "feature_dim": 64, "seed": 2, "epochs": 30, "lr": 3e-3},
}


# --------------------------------------------------------------------------------------------------
# Flow-matching training.
# --------------------------------------------------------------------------------------------------


def sample_flow_times(
    n: int,
    mode: TimeSampling = "logit_normal",
    *,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Training times for flow matching, shape ``(n,)`` in ``(0, 1)``.

    Args:
        n: Number of times.
        mode: ``"logit_normal"`` (``sigmoid(N(mean, std²))``) or ``"uniform"``.
        generator: CPU RNG.
        mean: Logit-normal location (> 0 shifts toward noise).
        std: Logit-normal scale.

    Returns:
        float32 ``(n,)`` on the CPU.
    """
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {mode!r}")


def _check_teacher_data(adapter: Any, images: Tensor, labels: Tensor) -> None:
    shape = tuple(adapter.sample_shape)
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must have shape (N, {', '.join(map(str, shape))}) (model range), got {got}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= adapter.num_classes):
        raise ValueError(f"labels must lie in [0, {adapter.num_classes})")


def train_flow_teacher(
    adapter: Any,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    label_dropout: float = 0.1,
    seed: int = 0,
    ema_decay: float | None = None,
    time_sampling: TimeSampling = "logit_normal",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train a class-conditional flow-matching model (in place) on ``(images, labels)``.

    Each step draws a batch (with replacement), noise ``ε``, times ``t``
    (:func:`sample_flow_times`) and replaces each label by the null class with probability
    ``label_dropout`` (:meth:`DiTAdapter.drop_labels`), then minimises
    ``mean‖v(x_t, t, c) − (ε − x0)‖²`` with ``x_t = (1 − t)·x0 + t·ε``. AdamW with linear warm-up
    and cosine decay to 10 % of ``lr``; optional grad-norm clipping. With ``ema_decay`` an
    exponential moving average of the weights is kept (decay ramped up as ``min(decay,
    (1 + s)/(10 + s))``) and copied into ``adapter`` at the end. All random draws come from
    generators seeded with ``seed``; the global RNG is untouched. The adapter is left in eval mode.

    Args:
        adapter: A :class:`~dmdr_fast.models.DiTAdapter` (anything with ``velocity``,
            ``drop_labels``, ``sample_shape``, ``num_classes``, ``parameters``).
        images: ``(N, C, H, W)`` training images in the model range (``[-1, 1]`` for digits).
        labels: ``(N,)`` integer class labels.
        steps: Optimiser steps.
        batch_size: Samples per step.
        lr: Peak learning rate.
        label_dropout: CFG label-dropout probability.
        seed: Seed of every random draw.
        ema_decay: EMA decay in ``[0, 1)``, or ``None`` for no EMA.
        time_sampling: ``"logit_normal"`` or ``"uniform"``.
        time_mean: Logit-normal location.
        time_std: Logit-normal scale.
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: Max grad norm, or ``None``.
        progress: Show a tqdm bar.
        log_fn: Called as ``log_fn(step, {"loss": ..., "lr": ..., "grad_norm": ...})`` every
            ``log_every`` steps and at the last step (``loss`` = mean since the previous call).
        log_every: Logging period in steps.

    Returns:
        ``steps``, ``seconds``, ``loss_initial`` (mean of the first logging window),
        ``loss_final`` (mean of the last 10 % of steps), ``loss_curve`` (list of
        ``[step, mean loss]``), ``ema`` (bool).
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {ema_decay}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    _check_teacher_data(adapter, images, labels)
    device = next(adapter.parameters()).device
    # Images live on the model's device; labels stay on the CPU, where the (CPU) generator draws the
    # label dropout, so that a run draws the same numbers on every device.
    images, labels = images.to(device=device, dtype=torch.float32), labels.cpu().long()
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    floor = 0.1

    def lr_factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress_ = (s - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = [p.detach().clone() for p in params] if ema_decay is not None else None
    bar = _progress(steps, "teacher", progress)
    curve: list[list[float]] = []
    window: list[Tensor] = []
    tail: list[Tensor] = []
    tail_start = steps - max(1, steps // 10)
    start = time.perf_counter()
    adapter.train()
    for step in range(steps):
        idx = torch.randint(images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx.to(device)]
        cond = labels[idx]
        if label_dropout > 0:
            cond = adapter.drop_labels(cond, label_dropout, generator=gen)
        cond = cond.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = sample_flow_times(batch_size, time_sampling, generator=gen, mean=time_mean, std=time_std).to(
            device
        )
        x_t = renoise(x0, t, noise)
        loss = F.mse_loss(adapter.velocity(x_t, t, cond), velocity_target(x0, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if grad_clip is not None
            else torch.tensor(math.nan)
        )
        optimizer.step()
        schedule.step()
        if ema is not None:
            assert ema_decay is not None  # ema exists exactly when ema_decay is given
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        window.append(loss.detach())
        if step >= tail_start:
            tail.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean_loss = float(torch.stack(window).mean())
            window.clear()
            curve.append([step + 1, mean_loss])
            if log_fn is not None:
                log_fn(
                    step + 1,
                    {
                        "loss": mean_loss,
                        "lr": float(schedule.get_last_lr()[0]),
                        "grad_norm": float(grad_norm),
                    },
                )
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)  # drawn by the update
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    adapter.eval()
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "loss_initial": curve[0][1],
        "loss_final": float(torch.stack(tail).mean()),
        "loss_curve": curve,
        "ema": ema is not None,
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5)


# --------------------------------------------------------------------------------------------------
# Config resolution, hashing and atomic cache files.
# --------------------------------------------------------------------------------------------------


def resolve_config(
    config: Mapping[str, Any] | None, defaults: Mapping[str, Any], name: str = "config"
) -> dict[str, Any]:
    """Deep-merge ``config`` over ``defaults``; unknown keys (at any level) raise.

    Sub-mappings of ``defaults`` are merged key by key; ``config[k] = None`` is kept as ``None``.

    Raises:
        ValueError: Naming the dotted path of an unknown key.
    """
    out = copy.deepcopy(dict(defaults))
    for key, value in (config or {}).items():
        if key not in defaults:
            raise ValueError(f"unknown key {name}.{key}; valid keys: {sorted(defaults)}")
        if isinstance(defaults[key], Mapping) and isinstance(value, Mapping):
            out[key] = resolve_config(value, defaults[key], f"{name}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_hash(config: Mapping[str, Any], kind: str) -> str:
    """16-hex-digit SHA-256 of ``kind`` + the canonical JSON of ``config`` (sorted keys)."""
    blob = json.dumps({"kind": kind, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _str(path: Path | None) -> str | None:
    return None if path is None else os.fspath(path)


def _try_load(path: Path, fmt: str, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached payload, or ``None`` (with a warning) if it is missing, unreadable or stale."""
    if not path.exists():
        return None
    try:
        payload = load_torch_file(path, map_location="cpu")  # a refused file is retrained too
    except Exception as exc:  # truncated / corrupt file: retrain and overwrite
        warnings.warn(f"ignoring unreadable cache file {path} ({type(exc).__name__}: {exc})", stacklevel=3)
        return None
    if not isinstance(payload, dict) or payload.get("format") != fmt or payload.get("config") != config:
        warnings.warn(f"ignoring cache file {path}: wrong format or config", stacklevel=3)
        return None
    return payload


# --------------------------------------------------------------------------------------------------
# The digits teacher.
# --------------------------------------------------------------------------------------------------


def _build_teacher(config: Mapping[str, Any]) -> Any:
    from dmdr_fast.models.dit import DiTAdapter, dit_from_config

    return DiTAdapter(dit_from_config(config["model"], seed=config["init_seed"]))


def cached_digits_teacher(
    cache_dir: str | os.PathLike[str] | None, config: Mapping[str, Any] | None = None
) -> Any | None:
    """The teacher :func:`get_or_train_digits_teacher` would load from ``cache_dir``, or ``None``
    when it is not there (or unreadable): never trains."""
    if cache_dir is None:
        return None
    resolved = resolve_config(config, DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")
    path = Path(cache_dir) / f"digits_teacher-{config_hash(resolved, _TEACHER_FORMAT)}.pt"
    payload = _try_load(path, _TEACHER_FORMAT, resolved)
    if payload is None:
        return None
    adapter = _build_teacher(resolved)
    adapter.transformer.load_state_dict(payload["state_dict"])
    return adapter.eval()


def get_or_train_digits_teacher(
    cache_dir: str | os.PathLike[str] | None,
    config: Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Any, dict[str, Any]]:
    """The digits teacher: loaded from ``cache_dir`` if trained before with this config, else trained.

    The config (merged over :data:`DEFAULT_DIGITS_TEACHER_CONFIG`) is hashed; the teacher lives in
    ``cache_dir/digits_teacher-<hash>.pt`` (written atomically). The teacher trains on all 1797
    digits in the model range ``[-1, 1]``.

    Args:
        cache_dir: Cache directory (created if needed), or ``None`` to always train, no caching.
        config: Overrides of :data:`DEFAULT_DIGITS_TEACHER_CONFIG` (``model``, ``init_seed``,
            ``train``); keys are checked.
        progress: Show a progress bar while training.
        device: Where to train and return the teacher (the cache file holds CPU tensors; the
            config hash does not include the device).

    Returns:
        ``(adapter, info)``: the :class:`~dmdr_fast.models.DiTAdapter` in eval mode on ``device``,
        and ``config`` (resolved), ``config_hash``, ``cache_path`` (str, or ``None``),
        ``cache_hit`` and ``stats`` (from :func:`train_flow_teacher`; on a hit, the stats stored
        when it was trained).
    """
    from dmdr_fast.recipes.digits.data import load_digits_tensors

    resolved = resolve_config(config, DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")
    digest = config_hash(resolved, _TEACHER_FORMAT)
    path = Path(cache_dir) / f"digits_teacher-{digest}.pt" if cache_dir is not None else None
    adapter = _build_teacher(resolved).to(device)
    payload = _try_load(path, _TEACHER_FORMAT, resolved) if path is not None else None
    if payload is not None:
        try:
            adapter.transformer.load_state_dict(payload["state_dict"])
        except (KeyError, RuntimeError) as exc:
            warnings.warn(f"ignoring cache file {path}: {exc}", stacklevel=2)
            payload = None
            adapter = _build_teacher(resolved).to(device)
    info: dict[str, Any] = {"config": resolved, "config_hash": digest, "cache_path": _str(path)}
    if payload is not None:
        adapter.eval()
        return adapter, {**info, "cache_hit": True, "stats": payload.get("stats", {})}
    images, labels = load_digits_tensors()
    stats = train_flow_teacher(adapter, images, labels, **resolved["train"], progress=progress)
    if path is not None:
        state = {k: v.detach().cpu() for k, v in adapter.transformer.state_dict().items()}
        atomic_save(
            {"format": _TEACHER_FORMAT, "config": resolved, "state_dict": state, "stats": stats}, path
        )
    return adapter, {**info, "cache_hit": False, "stats": stats}


# --------------------------------------------------------------------------------------------------
# The digits classifiers.
# --------------------------------------------------------------------------------------------------

_CLASSIFIER_ARCH_KEYS = ("width", "feature_dim", "dropout")


def _train_digits_classifier(
    spec: Mapping[str, Any], images: Tensor, labels: Tensor, progress: bool
) -> tuple[DigitClassifier, dict[str, float]]:
    arch = {k: spec[k] for k in _CLASSIFIER_ARCH_KEYS if k in spec}
    train_kwargs = {k: v for k, v in spec.items() if k not in _CLASSIFIER_ARCH_KEYS}
    return train_classifier(
        images, labels, config=DigitClassifierConfig(**arch), progress=progress, **train_kwargs
    )


def classifiers_cache_path(
    cache_dir: str | os.PathLike[str] | None, config: Mapping[str, Any] | None = None
) -> Path | None:
    """Where :func:`get_or_train_digits_classifiers` keeps the classifiers of ``config``."""
    if cache_dir is None:
        return None
    resolved = resolve_config(config, DEFAULT_DIGITS_CLASSIFIERS_CONFIG, "classifiers")
    return Path(cache_dir) / f"digits_classifiers-{config_hash(resolved, _CLASSIFIERS_FORMAT)}.pt"


def get_or_train_digits_classifiers(
    cache_dir: str | os.PathLike[str] | None,
    config: Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
) -> tuple[DigitClassifier, DigitClassifier, dict[str, Any]]:
    """The reward classifier and the evaluation network, cached like the teacher.

    The two are trained on the disjoint ``reward`` and ``eval`` splits of
    :func:`dmdr_fast.recipes.digits.data_splits` (images mapped to ``[0, 1]``), with the seeds and widths of
    ``config`` (merged over :data:`DEFAULT_DIGITS_CLASSIFIERS_CONFIG`; each of ``reward`` / ``eval``
    takes ``width``, ``feature_dim``, ``dropout`` and keyword arguments of
    :func:`~dmdr_fast.recipes.digits.classifier.train_classifier`).

    Args:
        cache_dir: Cache directory, or ``None`` for no caching.
        config: Overrides of :data:`DEFAULT_DIGITS_CLASSIFIERS_CONFIG`.
        progress: Show progress bars while training.

    Returns:
        ``(reward_classifier, eval_classifier, info)``; both in eval mode; ``info`` holds
        ``config``, ``config_hash``, ``cache_path`` (str or ``None``), ``cache_hit``, ``splits``
        (:class:`~dmdr_fast.data.DigitsSplits`) and ``metrics`` (``{"reward": ..., "eval": ...}``,
        from :func:`~dmdr_fast.recipes.digits.classifier.train_classifier`).
    """
    from dmdr_fast.recipes.digits.data import digits_splits, load_digits_tensors, to_unit_range

    resolved = resolve_config(config, DEFAULT_DIGITS_CLASSIFIERS_CONFIG, "classifiers")
    digest = config_hash(resolved, _CLASSIFIERS_FORMAT)
    path = Path(cache_dir) / f"digits_classifiers-{digest}.pt" if cache_dir is not None else None
    splits = digits_splits(resolved["split_seed"], resolved["reward_fraction"])
    info: dict[str, Any] = {
        "config": resolved,
        "config_hash": digest,
        "cache_path": _str(path),
        "splits": splits,
    }
    payload = _try_load(path, _CLASSIFIERS_FORMAT, resolved) if path is not None else None
    if payload is not None:
        try:
            models = []
            for role in ("reward", "eval"):
                model = DigitClassifier(DigitClassifierConfig(**payload["models"][role]["config"]))
                model.load_state_dict(payload["models"][role]["state_dict"])
                models.append(model.eval())
            return models[0], models[1], {**info, "cache_hit": True, "metrics": payload["metrics"]}
        except (KeyError, TypeError, RuntimeError) as exc:
            warnings.warn(f"ignoring cache file {path}: {exc}", stacklevel=2)
    images, labels = load_digits_tensors()
    images = to_unit_range(images)
    trained, metrics = {}, {}
    for role, idx in (("reward", splits.reward), ("eval", splits.eval)):
        trained[role], metrics[role] = _train_digits_classifier(
            resolved[role], images[idx], labels[idx], progress
        )
    if path is not None:
        models_payload = {
            role: {
                "config": {f: getattr(m.config, f) for f in DigitClassifierConfig.__dataclass_fields__},
                "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
            }
            for role, m in trained.items()
        }
        atomic_save(
            {"format": _CLASSIFIERS_FORMAT, "config": resolved, "models": models_payload, "metrics": metrics},
            path,
        )
    return trained["reward"], trained["eval"], {**info, "cache_hit": False, "metrics": metrics}
