"""Backend registry and dispatch for every op in :mod:`dmdr_fast.ops`.

Each op registers one :class:`BackendImpl` per backend, declaring what it can run (devices,
dtypes, a lazily evaluated availability check, and optional input-dependent checks). Choice:

1. an explicit ``backend=`` argument to the op,
2. else the innermost ``with dmdr_fast.use_backend(...)`` block,
3. else the ``DMDR_FAST_BACKEND`` environment variable,
4. else the automatic priority list of the op for the inputs' device.

Requests 1–3 are explicit: if the named backend cannot run these inputs, the op raises a
:class:`BackendUnavailableError` that lists *every* backend with its reasons. The automatic
choice silently takes the first backend that can run. A name that some op does not know (e.g.
``sdpa`` for an op without it) is skipped for that op by the context manager and env var, so a
global preference never breaks unrelated ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = [
    "Backend",
    "BackendImpl",
    "BackendUnavailableError",
    "availability_table",
    "get_backends",
    "register",
    "registered_ops",
    "select_backend",
    "use_backend",
]

ENV_VAR = "DMDR_FAST_BACKEND"


class Backend(str, Enum):
    """Known backend names. Ops may register others (e.g. ``sdpa`` for attention)."""

    TORCH = "torch"
    CPP = "cpp"
    CUDA = "cuda"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass(frozen=True)
class BackendImpl:
    """One op implemented by one backend, with its declared capabilities.

    Attributes:
        op: op name, e.g. ``"dmd_loss"``.
        name: backend name, e.g. ``"cpp"``.
        fn: the implementation; its signature is defined by the op.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes it accepts.
        availability: returns '' when the backend can run on a device type, else the reason
            (called lazily: checking must not import Triton or initialise CUDA at import time).
        input_checks: extra checks on the inputs returning reasons (e.g. a size limit).
        note: one-line description for ``dmdr-fast env``.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    availability: Callable[[str], str] = lambda device_type: ""
    input_checks: Sequence[Callable[..., list[str]]] = field(default_factory=tuple)
    note: str = ""

    def not_supported_reasons(
        self, device_type: str, dtypes: Sequence[torch.dtype], **inputs: Any
    ) -> list[str]:
        """Why this backend cannot run inputs on ``device_type`` with ``dtypes`` (empty: it can)."""
        reasons = []
        if device_type not in self.devices:
            reasons.append(f"runs on {sorted(self.devices)}, not {device_type!r}")
        bad = sorted({str(d).removeprefix("torch.") for d in dtypes if d not in self.dtypes})
        if bad:
            ok = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {', '.join(bad)} not supported (supports {', '.join(ok)})")
        if not reasons:
            why = self.availability(device_type)
            if why:
                reasons.append(why)
        if not reasons:
            for check in self.input_checks:
                reasons.extend(check(**inputs))
        return reasons


# op name -> backend name -> impl; and op name -> device type -> automatic priority.
_REGISTRY: dict[str, dict[str, BackendImpl]] = {}
_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {}
_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("dmdr_fast_backend", default=None)


def register(impl: BackendImpl) -> BackendImpl:
    """Add (or replace) one backend implementation of an op."""
    _REGISTRY.setdefault(impl.op, {})[impl.name] = impl
    return impl


def set_priority(op: str, device_type: str, names: Sequence[str]) -> None:
    """Automatic priority of backends for ``op`` on tensors of ``device_type``."""
    _PRIORITY.setdefault(op, {})[device_type] = tuple(names)


def _load_ops() -> None:
    import dmdr_fast.ops  # noqa: F401  (op modules register their backends on import)


def registered_ops() -> list[str]:
    """Names of all ops with at least one backend."""
    _load_ops()
    return sorted(_REGISTRY)


def get_backends(op: str) -> dict[str, BackendImpl]:
    """Backend name → implementation for ``op``."""
    if op not in _REGISTRY:
        _load_ops()
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {registered_ops()}")
    return dict(_REGISTRY[op])


@contextlib.contextmanager
def use_backend(name: str | Backend | None) -> Iterator[None]:
    """Prefer backend ``name`` for ops called inside the block (None restores automatic choice).

    Example:
        >>> with dmdr_fast.use_backend("cpp"):
        ...     loss = dmdr_fast.ops.dmd_loss(x0, x_t, t, v_fake, v_cond)
    """
    token = _CONTEXT.set(None if name is None else str(name))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _describe(op: str, device_type: str, dtypes: Sequence[torch.dtype], inputs: dict[str, Any]) -> str:
    lines = []
    for name, impl in _REGISTRY[op].items():
        reasons = impl.not_supported_reasons(device_type, dtypes, **inputs)
        lines.append(f"  {name}: " + ("available" if not reasons else "; ".join(reasons)))
    return "\n".join(lines)


def select_backend(
    op: str,
    requested: str | Backend | None,
    device_type: str,
    dtypes: Sequence[torch.dtype],
    **inputs: Any,
) -> BackendImpl:
    """Pick the backend that runs ``op`` (see the module docstring for the rules).

    Args:
        op: op name.
        requested: the op's explicit ``backend=`` argument, or None.
        device_type: device type of the inputs (``"cpu"``, ``"cuda"``).
        dtypes: dtypes of the floating inputs.
        **inputs: passed to the backends' input checks.

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run these inputs.
        ValueError: the requested name is not a backend of this op.
    """
    impls = get_backends(op)
    source, name = None, None
    if requested is not None:
        source, name = "argument backend=", str(requested)
        if name not in impls:
            raise ValueError(f"{op}: unknown backend {name!r}; choose one of {sorted(impls)}")
    else:
        for src, value in (("use_backend()", _CONTEXT.get()), (ENV_VAR, os.environ.get(ENV_VAR) or None)):
            if value is not None and value in impls:
                source, name = src, value
                break
    if name is not None:
        reasons = impls[name].not_supported_reasons(device_type, dtypes, **inputs)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} (requested by {source}) cannot run these inputs "
                f"(device {device_type}, dtypes {[str(d) for d in dtypes]}). All backends:\n"
                + _describe(op, device_type, dtypes, inputs)
            )
        return impls[name]
    priority = _PRIORITY.get(op, {}).get(device_type, tuple(impls))
    for candidate in priority:
        impl = impls.get(candidate)
        if impl is not None and not impl.not_supported_reasons(device_type, dtypes, **inputs):
            return impl
    raise BackendUnavailableError(
        f"{op}: no backend can run these inputs (device {device_type}). All backends:\n"
        + _describe(op, device_type, dtypes, inputs)
    )


def availability_table(device_types: Sequence[str] = ("cpu", "cuda")) -> list[dict[str, str]]:
    """Rows of (op, backend, device, status) for ``dmdr-fast env``; imports every op module."""
    rows = []
    for op in registered_ops():
        for name, impl in _REGISTRY[op].items():
            for dev in device_types:
                if dev not in impl.devices:
                    status = "-"
                else:
                    why = impl.availability(dev)
                    status = "yes" if not why else f"no: {why}"
                rows.append({"op": op, "backend": name, "device": dev, "status": status, "note": impl.note})
    return rows
