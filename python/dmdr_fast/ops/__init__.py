"""Public fused ops, and the explicit list of their backend tables (docs/architecture.md §5).

Each op module declares its backends as data (a module-level ``BACKENDS`` table,
:class:`dmdr_fast.backends.OpBackends`) and its public function dispatches over that table; no op
registers anything by being imported. :data:`OPS` names every op's table; ``dmdr-fast env`` prints
:func:`availability_table`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from dmdr_fast.backends import ENV_VAR, BackendImpl, OpBackends
from dmdr_fast.ops.attention import BACKENDS as ATTENTION_BACKENDS
from dmdr_fast.ops.attention import attention
from dmdr_fast.ops.attention_fp8 import BACKENDS as ATTENTION_FP8_BACKENDS
from dmdr_fast.ops.attention_fp8 import attention_fp8
from dmdr_fast.ops.dmd_loss import BACKENDS as DMD_LOSS_BACKENDS
from dmdr_fast.ops.dmd_loss import dmd_loss
from dmdr_fast.ops.quantize_fp8 import BACKENDS as QUANTIZE_FP8_BACKENDS
from dmdr_fast.ops.quantize_fp8 import quantize_fp8
from dmdr_fast.ops.reward_grad import BACKENDS as REWARD_GRAD_BACKENDS
from dmdr_fast.ops.reward_grad import RewardGradStats, reward_grad_combine

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_FP8_BACKENDS",
    "BACKEND_NAMES",
    "DMD_LOSS_BACKENDS",
    "OPS",
    "QUANTIZE_FP8_BACKENDS",
    "REWARD_GRAD_BACKENDS",
    "RewardGradStats",
    "attention",
    "attention_fp8",
    "availability_table",
    "check_backend_name",
    "dmd_loss",
    "env_backend_problem",
    "get_backends",
    "quantize_fp8",
    "reward_grad_combine",
]

#: Op name → its backend table, for every op of this package.
OPS: Mapping[str, OpBackends] = MappingProxyType(
    {
        "attention": ATTENTION_BACKENDS,
        "attention_fp8": ATTENTION_FP8_BACKENDS,
        "dmd_loss": DMD_LOSS_BACKENDS,
        "quantize_fp8": QUANTIZE_FP8_BACKENDS,
        "reward_grad_combine": REWARD_GRAD_BACKENDS,
    }
)


#: Every name some op's table declares (what ``use_backend`` / ``DMDR_FAST_BACKEND`` may name).
BACKEND_NAMES: frozenset[str] = frozenset(name for table in OPS.values() for name in table.impls)


def check_backend_name(name: str, source: str = "use_backend()") -> None:
    """Refuse a backend name no op declares (a typo would otherwise be skipped by every op).

    Raises:
        ValueError: Naming ``source`` and the valid backends.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"{source}: unknown backend {name!r}; valid backends: {', '.join(sorted(BACKEND_NAMES))}"
        )


def env_backend_problem() -> str | None:
    """What is wrong with ``$DMDR_FAST_BACKEND`` (a name no op declares), or None."""
    value = os.environ.get(ENV_VAR) or None
    if value is None or value in BACKEND_NAMES:
        return None
    return f"{ENV_VAR}={value!r} is not a backend of any op (valid: {', '.join(sorted(BACKEND_NAMES))})"


# The ops skip a preferred name they do not have, so a misspelt variable would change nothing,
# silently; said once here, when the ops are first imported.
if (_problem := env_backend_problem()) is not None:
    warnings.warn(f"{_problem}; ignored", stacklevel=2)


def get_backends(op: str) -> dict[str, BackendImpl]:
    """Backend name → implementation for the op named ``op``.

    Raises:
        KeyError: ``op`` is not an op of this package.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(OPS)}")
    return dict(OPS[op].impls)


def availability_table(device_types: Sequence[str] = ("cpu", "cuda")) -> list[dict[str, str]]:
    """Rows (op, backend, device, status, note) for ``dmdr-fast env``: ops by name, backends in
    declaration order."""
    return [row for op in sorted(OPS) for row in OPS[op].availability_rows(device_types)]
