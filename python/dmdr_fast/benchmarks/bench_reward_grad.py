"""``dmdr-fast bench reward-grad``: the fused reward-gradient combination against eager PyTorch,
torch.compile and the memory ceiling, all measured in the same run (BENCHMARKS.md).

Providers:
    eager    the reference (:func:`reward_grad_combine_ref`) cast to g_dmd's dtype, eager PyTorch
    compile  the same function under ``torch.compile`` (inductor)
    torch / cpp / cuda / triton   ``dmdr_fast.ops.reward_grad_combine`` with that backend

Every provider computes ``g`` and the per-sample statistics. The minimum traffic of an ideal kernel
is 2 reads (g_dmd, g_reward) + 1 write (g) of one tensor each (the (B,) statistics are
negligible); effective bandwidth is that over the time, and the copy ceiling is a ``copy_`` of the
same number of bytes.
"""

from __future__ import annotations

import math
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
from dmdr_fast.ops import reward_grad_combine
from dmdr_fast.ops.reference import reward_grad_combine_ref
from dmdr_fast.ops.reward_grad import BACKENDS

__all__ = ["BenchRow", "format_table", "main", "run", "setup"]

OP = "reward_grad_combine"
PROVIDERS = ("eager", "compile", "torch", "cpp", "cuda", "triton")


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


def _inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device, nonfinite: int, seed: int = 0):
    """g_dmd ~ N(0, 1) and a smaller, partly aligned g_reward with ``nonfinite`` NaN entries."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = torch.randn(tuple(shape), generator=gen)
    r = 0.1 * (torch.randn(tuple(shape), generator=gen) + 0.3 * d)
    if nonfinite:
        flat = r.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:nonfinite]] = float("nan")
    return d.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)


def _eager(g_dmd, g_reward, mode, weight, ratio, max_weight):
    g, stats = reward_grad_combine_ref(g_dmd, g_reward, mode, weight, ratio, max_weight)
    return g.to(g_dmd.dtype), stats


def setup(
    provider: str, g_dmd, g_reward, mode: str, weight: float, ratio: float, max_weight: float
) -> Callable:
    """A zero-argument callable running ``provider`` once; returns ``(g, stats)``."""
    if provider in ("eager", "compile"):
        fn = torch.compile(_eager, dynamic=False) if provider == "compile" else _eager
        return lambda: fn(g_dmd, g_reward, mode, weight, ratio, max_weight)
    return lambda: reward_grad_combine(
        g_dmd, g_reward, mode=mode, weight=weight, ratio=ratio, max_weight=max_weight, backend=provider
    )


def _bytes_moved(g_dmd: torch.Tensor) -> int:
    return 3 * g_dmd.numel() * g_dmd.element_size()  # 2 reads + 1 write


def run(
    shape: Sequence[int] = (8, 16, 128, 128),
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    providers: Sequence[str] = PROVIDERS,
    mode: str = "balanced",
    weight: float = 1.0,
    ratio: float = 1.0,
    max_weight: float = math.inf,
    nonfinite: int = 0,
    reps: int = 20,
    warmup: int = 3,
) -> dict:
    """Run the benchmark and return a JSON-able dict with machine info and one row per provider."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    d, r = _inputs(shape, dtype, dev, nonfinite)
    nbytes = _bytes_moved(d)
    copy_gbps, copy_t = copy_bandwidth(nbytes, dev, warmup=warmup, reps=reps)
    ref_g, _ = reward_grad_combine_ref(d.double(), r.double(), mode, weight, ratio, max_weight)
    rows: list[BenchRow] = []
    for p in providers:
        row = BenchRow(p)
        rows.append(row)
        if p not in ("eager", "compile"):
            reasons = BACKENDS.impls[p].not_supported_reasons(dev.type, [dtype], device=dev, batch=d.shape[0])
            if reasons:
                row.status = "unavailable: " + "; ".join(reasons)
                continue
        try:
            fn = setup(p, d, r, mode, weight, ratio, max_weight)
            out, _ = fn()  # correctness before timing (llm.c style)
            row.max_abs_err = float((out.double() - ref_g).abs().max())
            timing = time_fn(fn, dev, warmup=warmup, reps=reps)
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
            row.vs_copy = row.gbps / copy_gbps
            del out
            row.peak_extra_mb = peak_extra_mb(fn, dev)
        except Exception as exc:  # report, keep benchmarking the others
            row.status = f"error: {type(exc).__name__}: {exc}"[:300]
    fill_ratios(rows)
    return {
        "benchmark": "reward-grad",
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "max_weight": max_weight,
        "nonfinite": nonfinite,
        "bytes_moved": nbytes,
        "copy_gbps": copy_gbps,
        "copy_ms": copy_t.median_ms,
        "tensor_mb": d.numel() * d.element_size() / 2**20,
        "machine": machine_info(dev),
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run` result."""
    title = (
        f"reward-grad  shape={'x'.join(map(str, result['shape']))}  dtype={result['dtype']}  "
        f"mode={result['mode']}  max_weight={result['max_weight']}  nonfinite={result['nonfinite']}"
    )
    return format_bandwidth_table(result, title)


def main(args) -> int:
    """Entry point used by the CLI (``args`` from argparse)."""
    shape = tuple(int(s) for s in args.shape.lower().split("x"))
    result = run(
        shape=shape,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        providers=[p.strip() for p in args.providers.split(",")],
        mode=args.mode,
        weight=args.weight,
        ratio=args.ratio,
        max_weight=args.max_weight,
        nonfinite=args.nonfinite,
        reps=args.reps,
        warmup=args.warmup,
    )
    return report(result, format_table(result), args.json)
