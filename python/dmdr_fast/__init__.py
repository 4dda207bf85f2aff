"""dmdr_fast: few-step distillation of diffusion / flow models with DMD + reward RL (DMDR).

Importing this package needs neither a GPU, nor Triton, nor the compiled ``dmdr_fast._C``:
native pieces load lazily on first use and report what is missing (``dmdr-fast env``).
"""

from __future__ import annotations

import importlib
from typing import Any

from dmdr_fast.backends import Backend, BackendUnavailableError, use_backend

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


def __getattr__(name: str) -> Any:
    # Submodules load on first access so `import dmdr_fast` stays light.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"dmdr_fast.{name}")
    if name in ("Trainer", "DMDRTrainerConfig"):
        return getattr(importlib.import_module("dmdr_fast.train"), name)
    raise AttributeError(f"module 'dmdr_fast' has no attribute {name!r}")
