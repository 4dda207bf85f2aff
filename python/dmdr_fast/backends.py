"""Backend choice: the rules every op in :mod:`dmdr_fast.ops` dispatches by.

This module knows nothing about which ops exist. Each op module declares its backends as data,
an :class:`OpBackends` table (one :class:`BackendImpl` per backend, declaring what it can run:
devices, dtypes, a lazily evaluated availability check and optional input-dependent checks, plus
the automatic priority per device type), and its public function calls :func:`select_backend`
with that table. :mod:`dmdr_fast.ops` lists the tables (``dmdr_fast.ops.OPS``). Choice:

1. an explicit ``backend=`` argument to the op,
2. else the innermost ``with dmdr_fast.use_backend(...)`` block,
3. else the ``DMDR_FAST_BACKEND`` environment variable,
4. else the automatic priority list of the op for the inputs' device.

Requests 1–3 are explicit: if the named backend cannot run these inputs, the op raises a
:class:`BackendUnavailableError` that lists *every* backend with its reasons. The automatic
choice silently takes the first backend that can run. A name that some op does not know (e.g.
``sdpa`` for an op without it) is skipped for that op by the context manager and env var, so a
global preference never breaks unrelated ops. See docs/architecture.md §5.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendImpl",
    "BackendUnavailableError",
    "InputCheck",
    "OpBackends",
    "device_missing",
    "select_backend",
    "use_backend",
]

ENV_VAR = "DMDR_FAST_BACKEND"

#: An input-dependent check: keyword inputs of the op (``device``, ``head_dim``, ...) → reasons.
InputCheck = Callable[..., list[str]]


class Backend(str, Enum):
    """Known backend names. Ops may declare others (e.g. ``sdpa`` for attention)."""

    TORCH = "torch"
    CPP = "cpp"
    CUDA = "cuda"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def _always_available(device_type: str) -> str:
    return ""


def device_missing(device_type: str) -> str:
    """Why this process has no ``device_type`` device ('' when it has one): a backend that runs
    there is then not available, whatever its own check says (``dmdr-fast env``)."""
    if device_type != "cuda" or torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    return "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"


@dataclass(frozen=True)
class BackendImpl:
    """One op implemented by one backend, with its declared capabilities.

    Attributes:
        name: backend name, e.g. ``"cpp"``.
        fn: the implementation; its signature is defined by the op (the op's input record).
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes it accepts.
        availability: returns '' when the backend can run on a device type, else the reason
            (called lazily: checking must not import Triton or initialise CUDA at import time).
        input_checks: extra checks on the inputs returning reasons (e.g. a size limit).
        note: one-line description for ``dmdr-fast env``.
    """

    name: str
    fn: Callable[..., Any]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    availability: Callable[[str], str] = _always_available
    input_checks: Sequence[InputCheck] = field(default_factory=tuple)
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


@dataclass(frozen=True, eq=False)
class OpBackends:
    """The backends of one op, as data: what each can run and the automatic priority.

    Attributes:
        op: op name, e.g. ``"dmd_loss"`` (used in error messages).
        impls: backend name → implementation, in declaration order (the order of listings).
        priority: device type → backend names tried by the automatic choice, first to last; a
            device type without an entry tries every backend in declaration order.
    """

    op: str
    impls: Mapping[str, BackendImpl]
    priority: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(
        cls, op: str, impls: Sequence[BackendImpl], priority: Mapping[str, Sequence[str]]
    ) -> OpBackends:
        """A read-only table from a list of implementations (names unique) and priorities."""
        table = {impl.name: impl for impl in impls}
        if len(table) != len(impls):
            raise ValueError(f"{op}: duplicate backend names in {[impl.name for impl in impls]}")
        for device_type, names in priority.items():
            unknown = sorted(set(names) - set(table))
            if unknown:
                raise ValueError(f"{op}: priority for {device_type!r} names unknown backends {unknown}")
        frozen_priority = {device_type: tuple(names) for device_type, names in priority.items()}
        return cls(op, MappingProxyType(table), MappingProxyType(frozen_priority))

    def names(self) -> list[str]:
        """Backend names, sorted."""
        return sorted(self.impls)

    def availability_rows(self, device_types: Sequence[str] = ("cpu", "cuda")) -> list[dict[str, str]]:
        """Rows (op, backend, device, status, note) for ``dmdr-fast env``: '-' where a backend does
        not run on a device type, 'yes', or 'no: <reason>' (input checks are not evaluated)."""
        rows = []
        for name, impl in self.impls.items():
            for dev in device_types:
                if dev not in impl.devices:
                    status = "-"
                else:  # the device first: a backend is no use where its device type is not
                    why = device_missing(dev) or impl.availability(dev)
                    status = "yes" if not why else f"no: {why}"
                rows.append(
                    {"op": self.op, "backend": name, "device": dev, "status": status, "note": impl.note}
                )
        return rows


_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("dmdr_fast_backend", default=None)


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


def _describe(
    table: OpBackends, device_type: str, dtypes: Sequence[torch.dtype], inputs: dict[str, Any]
) -> str:
    lines = []
    for name, impl in table.impls.items():
        reasons = impl.not_supported_reasons(device_type, dtypes, **inputs)
        lines.append(f"  {name}: " + ("available" if not reasons else "; ".join(reasons)))
    return "\n".join(lines)


def select_backend(
    table: OpBackends,
    requested: str | Backend | None,
    device_type: str,
    dtypes: Sequence[torch.dtype],
    **inputs: Any,
) -> BackendImpl:
    """Pick the backend of ``table`` that runs the op (see the module docstring for the rules).

    Args:
        table: the op's backends.
        requested: the op's explicit ``backend=`` argument, or None.
        device_type: device type of the inputs (``"cpu"``, ``"cuda"``).
        dtypes: dtypes of the floating inputs.
        **inputs: passed to the backends' input checks.

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run these inputs.
        ValueError: the requested name is not a backend of this op.
    """
    op, impls = table.op, table.impls
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
                + _describe(table, device_type, dtypes, inputs)
            )
        return impls[name]
    for candidate in table.priority.get(device_type, tuple(impls)):
        impl = impls[candidate]
        if not impl.not_supported_reasons(device_type, dtypes, **inputs):
            return impl
    raise BackendUnavailableError(
        f"{op}: no backend can run these inputs (device {device_type}). All backends:\n"
        + _describe(table, device_type, dtypes, inputs)
    )
