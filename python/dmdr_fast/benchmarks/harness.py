"""Shared benchmark harness: timing, copy-bandwidth ceiling, peak extra memory, machine info.

Timing uses ``triton.testing.do_bench`` on GPUs when Triton is present (it flushes L2 between
runs), CUDA events otherwise, and a wall clock with synchronisation on CPUs. Every benchmark
reports ratios against baselines measured in the same run (BENCHMARKS.md), never absolute targets.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "PeakMemoryTracker",
    "Timing",
    "copy_bandwidth",
    "fill_ratios",
    "machine_info",
    "peak_extra_bytes",
    "peak_extra_mb",
    "time_fn",
]


@dataclass(frozen=True)
class Timing:
    """Run times in milliseconds: median and the 20th/80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(samples: list[float]) -> Timing:
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return Timing(statistics.median(s), q[1], q[7], len(s))


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> Timing:
    """Time ``fn()`` on ``device``.

    Args:
        fn: the work to time; called ``warmup + reps`` times.
        device: where the work runs (decides the clock).
        warmup: untimed calls first (compilation, caches, allocator).
        reps: timed calls.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], return_mode="median")
            return Timing(ms[0], ms[1], ms[2], reps)
        except ImportError:
            samples = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            return _quantiles(samples)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def copy_bandwidth(nbytes: int, device: torch.device, **kw) -> tuple[float, Timing]:
    """Measured copy rate for ``nbytes`` of traffic (half read, half written): (GB/s, timing).

    This is the memory ceiling a memory-bound op that moves ``nbytes`` is compared with.
    """
    n = max(1, nbytes // 2 // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, **kw)
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9, timing


class PeakMemoryTracker(TorchDispatchMode):
    """Tracks bytes of tensors freshly allocated by ATen ops while active, and their peak.

    Every op output that does not alias an input (per the op schema) is a new allocation; it is
    released when its tensor dies. Works on every device, including the CPU where PyTorch has no
    allocator statistics. Allocations outside ATen (e.g. inside a C++ kernel) are not seen — our
    kernels allocate nothing themselves.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        leaves = tree_leaves(out)
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                continue
            aliased = i < len(returns) and returns[i].alias_info is not None
            if aliased or t.untyped_storage().nbytes() == 0:
                continue
            nbytes = t.untyped_storage().nbytes()
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, nbytes)
        return out


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn()`` beyond what existed before (results dropped afterwards)."""
    with PeakMemoryTracker() as tracker:
        result = fn()
        del result
    return tracker.peak


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float:
    """MiB one call of ``fn`` allocates above what is already allocated: the CUDA allocator's peak
    on GPUs, :func:`peak_extra_bytes` (the CPU allocations torch reports) elsewhere."""
    if device.type != "cuda":
        return peak_extra_bytes(fn) / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fill_ratios(rows: list) -> None:
    """Set ``vs_eager`` / ``vs_compile`` of every successful row (speed relative to the ``eager``
    and ``compile`` providers of the same run, when they succeeded)."""
    by = {r.provider: r for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok":
            continue
        if "eager" in by:
            r.vs_eager = by["eager"].median_ms / r.median_ms
        if "compile" in by:
            r.vs_compile = by["compile"].median_ms / r.median_ms


def format_bandwidth_table(result: dict, title: str) -> str:
    """The table of a memory-bound op benchmark (``bench dmd-loss``, ``bench reward-grad``).

    Args:
        result: The benchmark's result: ``machine``, ``copy_gbps``, ``bytes_moved``, ``copy_ms``,
            ``tensor_mb`` and ``rows`` (provider, median_ms, gbps, vs_eager, vs_compile, vs_copy,
            peak_extra_mb, max_abs_err, status).
        title: The first line (benchmark name and its settings).
    """
    m = result["machine"]
    head = (
        f"{title}\n{m.get('gpu', m['cpu'])}  threads={m['threads']}  torch {m['torch']}  {m['date']}\n"
        f"copy ceiling: {result['copy_gbps']:.1f} GB/s for {result['bytes_moved'] / 2**20:.0f} MiB moved "
        f"({result['copy_ms']:.3f} ms); one tensor = {result['tensor_mb']:.1f} MiB\n"
    )
    cols = f"{'provider':<9}{'median ms':>11}{'GB/s':>9}{'×eager':>9}{'×compile':>10}{'%copy':>8}{'extra MiB':>11}{'max err':>10}  status"
    lines = [head, cols]
    for r in result["rows"]:
        lines.append(
            f"{r['provider']:<9}{r['median_ms']:>11.3f}{r['gbps']:>9.1f}{r['vs_eager']:>9.2f}{r['vs_compile']:>10.2f}"
            f"{100 * r['vs_copy']:>7.0f}%{r['peak_extra_mb']:>11.1f}{r['max_abs_err']:>10.1e}  {r['status']}"
        )
    return "\n".join(lines)


def report(result: dict, text: str, json_path: str | None) -> int:
    """Print a benchmark's table and, if asked, write its result as JSON; the CLI exit code (0)."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}")
    return 0


def machine_info(device: torch.device) -> dict[str, str]:
    """Machine, versions and date, recorded with every benchmark result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
