"""Input validation, launcher helpers and the backend table of the fused ops, shared by every op.

Validation happens once, in Python, before any backend runs: the compiled kernels trust their
inputs (they receive raw pointers), so every check that protects them lives here. Messages name
the argument, what was expected and what was received. See docs/architecture.md §5.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeGuard, TypeVar

import torch

from dmdr_fast._native import get_native, native_error, triton_error
from dmdr_fast.backends import BackendImpl, InputCheck, OpBackends

__all__ = [
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "FUSED_DTYPES",
    "OUT_MAX",
    "TRITON_BLOCK",
    "TRITON_MAX_ITERS",
    "TRITON_MAX_PARTIALS",
    "check_float_tensor",
    "check_same_device",
    "check_same_shape",
    "cuda_capability_check",
    "device_context",
    "dtype_code",
    "fused_backends",
    "gpu_triton_grid",
    "is_number",
    "native_available",
    "on_input_device",
    "promote",
    "triton_grid",
]

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
# Fused kernels compute in float32 and store in these; float64 is served by the reference.
FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
# The FP8 formats of the package (the one home of FP8 dtypes and limits: ops.quantize_fp8,
# ops.attention_fp8): e4m3fn for activations and weights, e5m2 (wider range) for gradients.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Largest finite value of each output dtype: stores into a narrower dtype saturate there, so that a
# 16-bit output never holds ±Inf (float64: no bound) and an FP8 cast never depends on how a
# backend treats out-of-range values (torch 2.13 saturates to e4m3fn but overflows to e5m2's Inf).
OUT_MAX = {
    torch.float64: math.inf,
    torch.float32: 3.4028234663852886e38,
    torch.float16: 65504.0,
    torch.bfloat16: 3.3895313892515355e38,
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}
# csrc/include/dmdr_fast/dtype.h; the FP8 codes are output types only (quantize_fp8's q).
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
}
# The elementwise Triton kernels' launch shape on a GPU (:func:`triton_grid`): elements per
# program and iteration, the iteration count up to which programs are added before iterating more,
# and the most blocks per sample (the second kernel loads a sample's partial sums in one tile).
TRITON_BLOCK = 1024
TRITON_MAX_ITERS = 16
TRITON_MAX_PARTIALS = 4096


def is_number(x: object) -> TypeGuard[float]:
    """A Python int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_float_tensor(op: str, name: str, x: object) -> torch.Tensor:
    """Raise unless ``x`` is a real floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point() or x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must be float32, float16, bfloat16 or float64, got {x.dtype} "
            "(integer and complex tensors are not accepted)"
        )
    return x


def check_same_shape(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise unless every tensor in ``others`` has ``ref``'s shape."""
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{op}: `{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, got {tuple(x.shape)}"
            )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Raise unless all given tensors live on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on the same device, got {listing}")
    return next(iter(present.values())).device


def promote(tensors: Sequence[torch.Tensor | None]) -> torch.dtype:
    """Common dtype of the non-None tensors (torch's promotion rules)."""
    dt = None
    for x in tensors:
        if x is not None:
            dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    assert dt is not None
    return dt


def dtype_code(dtype: torch.dtype) -> int:
    """The integer code ``dmdr_fast._C`` uses for ``dtype`` (see csrc/include/dmdr_fast/dtype.h)."""
    return _DTYPE_CODES[dtype]


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability_check(min_major: int, min_minor: int = 0) -> InputCheck:
    """An input check refusing CUDA devices below compute capability ``min_major.min_minor``."""

    def check(*, device: torch.device, **_: object) -> list[str]:
        if device.type != "cuda":
            return []
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if cap < (min_major, min_minor):
            return [f"needs compute capability >= {min_major}.{min_minor}, device has {cap[0]}.{cap[1]}"]
        return []

    return check


# ----------------------------------------------------------------------------- launchers


def device_context(device: torch.device) -> AbstractContextManager[object]:
    """Make ``device`` current while launching on it: Triton launches on the *current* CUDA device,
    which need not be the inputs' (``train.device=cuda:1``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _OnDevice(Protocol):
    @property
    def device(self) -> torch.device: ...


_RecordT = TypeVar("_RecordT", bound=_OnDevice)
_ResultT = TypeVar("_ResultT")


def on_input_device(fn: Callable[[_RecordT], _ResultT]) -> Callable[[_RecordT], _ResultT]:
    """Decorator of a launcher: run it under :func:`device_context` of its input record's device."""

    @functools.wraps(fn)
    def wrapper(p: _RecordT) -> _ResultT:
        with device_context(p.device):
            return fn(p)

    return wrapper


def triton_grid(B: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_SIZE, ITERS, blocks per sample): ~4 programs per SM in total on a GPU."""
    if device.type == "cuda":
        return gpu_triton_grid(B, D, torch.cuda.get_device_properties(device).multi_processor_count)
    return _split_rows(D, 128, 4)  # interpreter: few, small programs keep it fast


def gpu_triton_grid(B: int, D: int, sm_count: int) -> tuple[int, int, int]:
    """:func:`triton_grid` on a GPU with ``sm_count`` SMs (a function of numbers only, so that
    :mod:`dmdr_fast.ops.triton_configs` can enumerate its choices without a GPU)."""
    return _split_rows(D, TRITON_BLOCK, max(1, -(-4 * sm_count // B)))


def _split_rows(D: int, block: int, target: int) -> tuple[int, int, int]:
    """(block, ITERS, blocks per sample) for ~``target`` programs per sample of ``D`` elements."""
    iters = 1
    while iters < TRITON_MAX_ITERS and block * iters * target < D:
        iters *= 2
    while -(-D // (block * iters)) > TRITON_MAX_PARTIALS:  # one program loads the partial-sum row
        iters *= 2
    return block, iters, -(-D // (block * iters))


# ----------------------------------------------------------------------------- backend table


def native_available(device_type: str) -> str:
    """Why the ``dmdr_fast._C`` kernels cannot run on ``device_type`` ('' when they can)."""
    native = get_native()
    if native is None:
        return native_error()
    if device_type == "cuda":
        if not native.build_info()["cuda"]:
            return "dmdr_fast._C was built without CUDA (reinstall with nvcc and DMDR_FAST_CUDA=ON)"
        count, why = native.cuda_device_count()
        if count == 0:
            return f"no CUDA device visible to dmdr_fast._C ({why})"
    return ""


def fused_backends(
    op: str,
    torch_fn: Callable[..., object],
    cpp_fn: Callable[..., object],
    cuda_fn: Callable[..., object],
    triton_fn: Callable[..., object],
    *,
    cuda_checks: Sequence[InputCheck] = (),
    triton_checks: Sequence[InputCheck] = (),
) -> OpBackends:
    """The backend table of a fused op: four backends and their automatic priorities.

    torch (the reference, every float dtype), cpp (CPU), cuda (compute capability >= 8.0, plus
    ``cuda_checks``) and triton (plus ``triton_checks``); the fused ones take ``FUSED_DTYPES``.
    Priority: cuda, triton, torch on CUDA tensors; cpp, torch on CPU tensors.
    """
    impls = (
        BackendImpl(
            "torch", torch_fn, frozenset({"cpu", "cuda"}), FLOAT_DTYPES,
            note="pure-PyTorch reference (the spec)",
        ),
        BackendImpl(
            "cpp", cpp_fn, frozenset({"cpu"}), FUSED_DTYPES, native_available,
            note="fused C++ kernel, OpenMP",
        ),
        BackendImpl(
            "cuda", cuda_fn, frozenset({"cuda"}), FUSED_DTYPES, native_available,
            input_checks=(cuda_capability_check(8, 0), *cuda_checks),
            note="fused CUDA kernels, 16-byte vector loads",
        ),
        BackendImpl(
            "triton", triton_fn, frozenset({"cpu", "cuda"}), FUSED_DTYPES, triton_error,
            input_checks=tuple(triton_checks), note="fused Triton kernels (CPU: interpreter only)",
        ),
    )  # fmt: skip
    return OpBackends.build(op, impls, {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")})
