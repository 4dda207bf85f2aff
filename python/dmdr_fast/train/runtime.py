"""Process-wide run settings: the training device, deterministic algorithms scoped to a block, and
``torch.compile`` of the networks (whose recompile budget is process-wide)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmdr_fast._errors import UserError
from dmdr_fast.config import ConfigError, TrainConfig
from dmdr_fast.train.distributed import local_device

__all__ = [
    "TrainerState",
    "check_runnable",
    "compile_networks",
    "deterministic_algorithms",
    "deterministic_scope",
    "ema_update",
    "gather_streams",
    "mean_metrics",
    "resolve_device",
    "restore_streams",
    "swapped_weights",
]

_RECOMPILE_LIMIT = 64  # see compile_networks


def resolve_device(name: str) -> torch.device:
    """``train.device`` → a device (``"auto"``: CUDA if available, else CPU; under torchrun each
    process its ``cuda:LOCAL_RANK``)."""
    return local_device(name)


def check_runnable(train: TrainConfig) -> None:
    """Refuse, before any slow work, the ``train.*`` settings this machine cannot run.

    The config's own checks see only the values; whether CUDA is there or a backend can run is a
    property of the machine, found otherwise only once the teacher is trained or loaded.

    Raises:
        ConfigError: ``train.device`` names CUDA (or a CUDA index) that is not there;
            ``train.attention`` / ``train.kernel_backend`` is not a backend of its op, or cannot
            run on the run's device type.
    """
    from dmdr_fast import ops

    device = train.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(
                f"{device!r}: CUDA is not available ({why}); use 'cpu' or 'auto'", field="train.device"
            )
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"{device!r}: there are {torch.cuda.device_count()} CUDA devices (0-based)",
                field="train.device",
            )
    device_type = resolve_device(device).type
    checks = [("attention", "attention", train.attention not in ("auto", "native"))]
    checks += [
        ("kernel_backend", op, train.kernel_backend is not None) for op in ("dmd_loss", "reward_grad_combine")
    ]
    for field, op, requested in checks:
        if not requested:
            continue
        name, table = getattr(train, field), ops.OPS[op]
        extra = ", 'auto' or 'native'" if op == "attention" else " or null (automatic)"
        if name not in table.impls:
            raise ConfigError(
                f"{name!r} is not a backend of {op}; choose one of {table.names()}{extra}",
                field=f"train.{field}",
            )
        impl = table.impls[name]
        why = (
            f"runs on {sorted(impl.devices)}, and this run is on {device_type} (train.device={device!r})"
            if device_type not in impl.devices
            else impl.availability(device_type)
        )
        if why:
            raise ConfigError(f"{name!r} cannot run {op} here: {why}", field=f"train.{field}")
    problem = ops.env_backend_problem()
    if problem is not None:  # a run must not start on another backend than the one asked for
        raise UserError(f"{problem}; unset it or name one of them")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block, the caller's
    setting (flag and ``warn_only``) restored afterwards; nothing changes when ``enabled`` is false."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def compile_networks(networks: Iterable[nn.Module], train: TrainConfig) -> None:
    """``train.compile``: ``nn.Module.compile`` on every network, in place.

    In place (not ``torch.compile(module)``) so that parameter names, checkpoints, DDP and the
    export see the same modules as without compilation (a deep copy is uncompiled). Per-sample
    LoRA scales reach the graphs as tensor inputs and scalar ones as symbolic floats (dynamo
    does not specialise floats), so DynaDG's annealed λ_r does not recompile every step.

    Raises:
        ValueError: ``train.compile_backend`` is not a torch.compile backend.
    """
    known = torch.compiler.list_backends(exclude_tags=())
    if train.compile_backend not in known:
        raise ValueError(
            f"train.compile_backend {train.compile_backend!r} is not a torch.compile backend: {known}"
        )
    kwargs: dict[str, Any] = {"backend": train.compile_backend}
    if train.compile_backend == "inductor":
        kwargs["mode"] = train.compile_mode
    for net in networks:
        net.compile(**kwargs)
    # The networks share one code object (same class), so their variants — grad / no-grad,
    # per-sample / scalar / no LoRA scale, batch sizes of training, sampling and evaluation —
    # count against one recompile limit (default 8); past it dynamo silently runs eager.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser updates (LoRA factors only, when the base is frozen)."""
    return [p for p in module.parameters() if p.requires_grad]


def grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """The gradients' total norm (clipped to ``clip`` if > 0), as a 0-dim tensor: reading it out
    (``float``) waits for the device, so that is left to the logging, once per generator step.

    ``clip = 0`` means no clipping (``clip_grad_norm_`` with 0 would zero every gradient).
    """
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip).detach()
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], network: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·θ`` for every parameter of ``network`` named in ``ema``."""
    for n, p in network.named_parameters():
        if n in ema:
            ema[n].lerp_(p.detach(), 1 - decay)


@contextlib.contextmanager
def swapped_weights(network: nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily copy ``weights`` (name → tensor) into ``network``'s parameters; the originals
    come back on exit, also when the block raises. ``None``: a no-op."""
    if weights is None:
        yield
        return
    params = dict(network.named_parameters())
    backup = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in backup.items():
                params[n].copy_(v)


def mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """The per-key mean of the metrics of k micro-batches (one micro-batch: its own dict)."""
    if len(parts) == 1:
        return parts[0]
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


@dataclass
class TrainerState:
    """Counters that, with the RNG state and the weights, fully determine the rest of a run."""

    step: int = 0  # iterations (critic updates)
    gen_step: int = 0  # generator updates: the schedules' s
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # evaluation results
    ode_init_done: bool = False  # student.ode_init's regression has run (not repeated on resume)


def deterministic_scope(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Trainer method under ``train.deterministic`` (the flag is process-wide: the caller's
    code keeps its own setting; the CLI wraps whole runs, evaluation and export included)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with deterministic_algorithms(self.config.train.deterministic):
            return method(self, *args, **kwargs)

    return wrapper


def gather_streams(gens: list[torch.Generator], world: int) -> list[torch.Tensor]:
    """Every rank's micro-batch RNG states, world-ordered (slot r·k + i); a collective if world > 1."""
    states = [g.get_state() for g in gens]
    if world <= 1:
        return states
    per_rank: list[Any] = [None] * world
    torch.distributed.all_gather_object(per_rank, states)
    return [state for rank in per_rank for state in rank]


def restore_streams(
    gens: list[torch.Generator], saved: list[torch.Tensor], rank: int, seed: int
) -> str | None:
    """Set a rank's micro-batch RNG streams from a checkpoint's world-ordered slot states.

    Slot ``r·k + i`` is rank r's micro-batch i. With as many slots as saved (same world size × grad
    accumulation) each stream continues exactly. Otherwise (a resharded resume, or a checkpoint
    from before the slots were saved) no saved stream can be assigned without drawing some samples
    twice, so every slot is re-seeded from (seed, slot, the saved stream): the run continues with
    the same distribution, not the same numbers — the returned note says so.
    """
    k = len(gens)
    world_slots = k * (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    if len(saved) == world_slots:
        for i, g in enumerate(gens):
            g.set_state(saved[rank * k + i])
        return None
    for i, g in enumerate(gens):
        slot = rank * k + i
        g.manual_seed(seed + 1_000_003 * (slot + 1) + int(saved[0].to(torch.int64).sum()))
    return (
        f"RNG: the checkpoint has {len(saved)} micro-batch stream(s), this run {world_slots}: "
        "streams re-seeded (same distribution, not the same numbers as an uninterrupted run)"
    )
