"""``dmdr-fast bench quantize-fp8``: row-wise FP8 quantisation against eager PyTorch,
torch.compile and the memory ceiling, all measured in the same run (docs/architecture.md §7).

Providers:
    eager    the reference (:func:`quantize_fp8_ref`) in eager PyTorch
    compile  the same function under ``torch.compile`` (inductor)
    torch / cpp / cuda / triton   ``dmdr_fast.ops.quantize_fp8`` with that backend

Every provider returns ``(q, scale)``. The minimum traffic of an ideal kernel is one read of x
and one write of q (one byte per element) and of the scales (four bytes per row); effective
bandwidth is that over the time, and the copy ceiling is a ``copy_`` of the same number of bytes
(the GPU target of the op is 85 % of it). ``max err`` is the largest difference of the
dequantised ``q·scale`` from the float32 reference's (0 when the codes agree bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from dmdr_fast.benchmarks.harness import (
    copy_bandwidth,
    fill_ratios,
    format_bandwidth_table,
    machine_info,
    peak_extra_mb,
    report,
    time_fn,
)
from dmdr_fast.ops import quantize_fp8
from dmdr_fast.ops.quantize_fp8 import BACKENDS
from dmdr_fast.ops.reference import quantize_fp8_ref

__all__ = ["BenchRow", "format_table", "main", "run", "setup"]

PROVIDERS = ("eager", "compile", "torch", "cpp", "cuda", "triton")
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass
class BenchRow:
    provider: str
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    gbps: float = float("nan")
    vs_eager: float = float("nan")
    vs_compile: float = float("nan")
    vs_copy: float = float("nan")
    peak_extra_mb: float = float("nan")
    max_abs_err: float = float("nan")
    status: str = "ok"


def setup(
    provider: str, x: torch.Tensor, fp8_dtype: torch.dtype
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A zero-argument callable running ``provider`` once; returns (q, scale)."""
    if provider in ("eager", "compile"):
        fn = quantize_fp8_ref
        if provider == "compile":
            fn = torch.compile(quantize_fp8_ref, dynamic=False)
        return lambda: fn(x, fp8_dtype)
    return lambda: quantize_fp8(x, fp8_dtype, backend=provider)


def _bytes_moved(x: torch.Tensor) -> int:
    rows = x.numel() // x.shape[-1]
    return x.numel() * (x.element_size() + 1) + 4 * rows


def run(
    shape: Sequence[int] = (4096, 4096),
    dtype: torch.dtype = torch.bfloat16,
    fp8: str = "e4m3",
    device: str = "auto",
    providers: Sequence[str] = PROVIDERS,
    reps: int = 20,
    warmup: int = 3,
) -> dict:
    """Run the benchmark and return a JSON-able dict with machine info and one row per provider."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    fp8_dtype = FP8[fp8]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tuple(shape), generator=gen).to(device=dev, dtype=dtype)
    nbytes = _bytes_moved(x)
    copy_gbps, copy_t = copy_bandwidth(nbytes, dev, warmup=warmup, reps=reps)
    ref_q, ref_scale = quantize_fp8_ref(x, fp8_dtype)
    ref_deq = ref_q.double() * ref_scale.double()
    rows: list[BenchRow] = []
    for p in providers:
        row = BenchRow(p)
        rows.append(row)
        if p not in ("eager", "compile"):
            reasons = BACKENDS.impls[p].not_supported_reasons(dev.type, [dtype], device=dev)
            if reasons:
                row.status = "unavailable: " + "; ".join(reasons)
                continue
        try:
            fn = setup(p, x, fp8_dtype)
            q, scale = fn()  # correctness before timing
            row.max_abs_err = float((q.double() * scale.double() - ref_deq).abs().max())
            timing = time_fn(fn, dev, warmup=warmup, reps=reps)
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
            row.vs_copy = row.gbps / copy_gbps
            del q, scale
            row.peak_extra_mb = peak_extra_mb(fn, dev)
        except Exception as exc:  # report, keep benchmarking the others
            row.status = f"error: {type(exc).__name__}: {exc}"[:300]
    fill_ratios(rows)
    return {
        "benchmark": "quantize-fp8",
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "fp8": fp8,
        "bytes_moved": nbytes,
        "copy_gbps": copy_gbps,
        "copy_ms": copy_t.median_ms,
        "tensor_mb": x.numel() * x.element_size() / 2**20,
        "machine": machine_info(dev),
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run` result."""
    title = f"quantize-fp8  shape={'x'.join(map(str, result['shape']))}  dtype={result['dtype']}  fp8={result['fp8']}"
    return format_bandwidth_table(result, title)


def main(args) -> int:
    """Entry point used by the CLI (``args`` from argparse)."""
    result = run(
        shape=tuple(int(s) for s in args.shape.lower().split("x")),
        dtype=getattr(torch, args.dtype),
        fp8=args.fp8,
        device=args.device,
        providers=[p.strip() for p in args.providers.split(",")],
        reps=args.reps,
        warmup=args.warmup,
    )
    return report(result, format_table(result), args.json)
