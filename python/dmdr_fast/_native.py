"""Lazy loaders for the optional native pieces: the compiled ``dmdr_fast._C`` and Triton.

Nothing here runs at ``import dmdr_fast`` time. Each loader is cached and, when the piece is
missing, records *why* so that backend refusals and ``dmdr-fast env`` can tell the user what to do.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

__all__ = [
    "get_native",
    "get_triton_kernels",
    "native_error",
    "triton_error",
]


@functools.cache
def _load_native() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("dmdr_fast._C"), ""
    except ImportError as exc:  # not built, or built for another Python / platform
        return None, (
            f"dmdr_fast._C could not be imported ({exc}); reinstall with "
            "`pip install --no-build-isolation -e .` (needs a C++17 compiler and CMake >= 3.30)"
        )


def get_native() -> ModuleType | None:
    """The compiled module ``dmdr_fast._C``, or None if it is not available."""
    return _load_native()[0]


def native_error() -> str:
    """Why ``dmdr_fast._C`` is unavailable ('' when it loaded)."""
    return _load_native()[1]


@functools.cache
def _load_triton() -> tuple[bool, str]:
    try:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (`pip install triton`)"
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install must not break dmdr_fast
        return False, f"triton failed to import ({exc}); reinstall it with `pip install triton`"
    return True, ""


def triton_error(device_type: str) -> str:
    """Why Triton kernels cannot run on ``device_type`` ('' when they can).

    On CPU tensors Triton runs only through its interpreter (``TRITON_INTERPRET=1``), which is
    how the test-suite exercises the kernels on machines without a GPU.
    """
    ok, why = _load_triton()
    if not ok:
        return why
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton needs a GPU; on CPU tensors it runs only with TRITON_INTERPRET=1 (the interpreter)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels are not built for device type {device_type!r}"
    return ""


def get_triton_kernels(name: str) -> ModuleType:
    """Import ``dmdr_fast.kernels.<name>`` (which imports triton)."""
    return importlib.import_module(f"dmdr_fast.kernels.{name}")
