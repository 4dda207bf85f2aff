"""dmdr_fast: few-step distillation of diffusion / flow models with DMD + reward RL (DMDR).

Importing this package needs neither a GPU, nor Triton, nor the compiled ``dmdr_fast._C``:
native pieces load lazily on first use and report what is missing (``dmdr-fast env``).
"""

from __future__ import annotations

import importlib
from typing import Any

from dmdr_fast import backends as _backends
from dmdr_fast.backends import Backend, BackendUnavailableError

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "DMDRTrainerConfig",
    "Trainer",
    "__version__",
    "ops",
    "use_backend",
]

_LAZY_SUBMODULES = {
    "ops",
    "algo",
    "models",
    "eval",
    "train",
    "rewards",
    "benchmarks",
    "cli",
    "data",
    "recipes",
    "config",
    "configs",
    "conditions",
    "pipelines",
}


def use_backend(name: str | Backend | None) -> Any:
    """:func:`dmdr_fast.backends.use_backend` (a ``with`` block preferring backend ``name``), with
    the name checked first: one no op declares raises ``ValueError`` listing the valid ones.

    Example:
        >>> with dmdr_fast.use_backend("cpp"):
        ...     loss = dmdr_fast.ops.dmd_loss(x0, x_t, t, v_fake, v_cond)
    """
    if name is not None:
        importlib.import_module("dmdr_fast.ops").check_backend_name(str(name))
    return _backends.use_backend(name)


def __getattr__(name: str) -> Any:
    # Submodules load on first access so `import dmdr_fast` stays light.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"dmdr_fast.{name}")
    if name in ("Trainer", "DMDRTrainerConfig"):
        return getattr(importlib.import_module("dmdr_fast.train"), name)
    raise AttributeError(f"module 'dmdr_fast' has no attribute {name!r}")
