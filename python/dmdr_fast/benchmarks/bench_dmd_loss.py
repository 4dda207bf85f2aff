"""``dmdr-fast bench dmd-loss``: the fused DMD loss against eager PyTorch, torch.compile and the
memory ceiling, all measured in the same run (BENCHMARKS.md).

Providers:
    eager    the reference (:func:`dmd_loss_ref`) plus the x0-gradient, in eager PyTorch
    compile  the same function under ``torch.compile`` (inductor)
    torch / cpp / cuda / triton   ``dmdr_fast.ops.dmd_loss`` with that backend

Each provider computes the loss and the x0-gradient ``g / numel`` (mode ``full``) or the loss and
the direction ``g`` (mode ``fwd``). Effective bandwidth counts every input read once and every
output written once; the copy ceiling is a ``copy_`` of the same number of bytes.
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
from dmdr_fast.ops import dmd_loss
from dmdr_fast.ops.dmd_loss import BACKENDS
from dmdr_fast.ops.reference import dmd_loss_ref

__all__ = ["BenchRow", "run", "setup"]

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


def _inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device, cfg: bool, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd():
        return torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)

    x0 = rnd()
    t = torch.rand(shape[0], generator=gen).to(device)
    return x0, rnd(), t, rnd(), rnd(), rnd() if cfg else None


def _eager_full(x0, x_t, t, vf, vc, vu, w):
    loss, g = dmd_loss_ref(x0, x_t, t, vf, vc, vu, w)
    return loss, (g / g.numel()).to(x0.dtype)


def setup(provider: str, x0, x_t, t, vf, vc, vu, w: float, mode: str) -> Callable[[], tuple]:
    """A zero-argument callable running ``provider`` once; returns (loss, gradient or direction)."""
    if provider in ("eager", "compile"):
        fn = _eager_full if mode == "full" else (lambda *a: dmd_loss_ref(*a))
        if provider == "compile":
            fn = torch.compile(fn, dynamic=False)
        return lambda: fn(x0, x_t, t, vf, vc, vu, w)
    if mode == "fwd":

        def fwd() -> tuple[torch.Tensor, torch.Tensor]:
            loss, g = dmd_loss(x0, x_t, t, vf, vc, vu, w, backend=provider, return_direction=True)
            return loss, g

        return fwd
    leaf = x0.detach().requires_grad_(True)

    def full():
        leaf.grad = None
        loss = dmd_loss(leaf, x_t, t, vf, vc, vu, w, backend=provider)
        loss.backward()
        return loss, leaf.grad

    return full


def _bytes_moved(x0: torch.Tensor, cfg: bool, mode: str) -> int:
    n_in = 5 if cfg else 4  # x0, x_t, v_fake, v_cond(, v_uncond); t is negligible
    n_out = 1  # g, or the gradient in full mode (our backward reads g once more: not counted)
    return (n_in + n_out) * x0.numel() * x0.element_size()


def run(
    shape: Sequence[int] = (8, 16, 128, 128),
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    providers: Sequence[str] = PROVIDERS,
    cfg: bool = True,
    guidance: float = 3.0,
    mode: str = "full",
    reps: int = 20,
    warmup: int = 3,
) -> dict:
    """Run the benchmark and return a JSON-able dict with machine info and one row per provider."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    x0, x_t, t, vf, vc, vu = _inputs(shape, dtype, dev, cfg)
    nbytes = _bytes_moved(x0, cfg, mode)
    copy_gbps, copy_t = copy_bandwidth(nbytes, dev, warmup=warmup, reps=reps)
    x_t64, t64, vf64, vc64, vu64 = (a.double() if a is not None else None for a in (x_t, t, vf, vc, vu))
    _, ref_out = setup("eager", x0.double(), x_t64, t64, vf64, vc64, vu64, guidance, mode)()
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
            fn = setup(p, x0, x_t, t, vf, vc, vu, guidance, mode)
            loss, out = fn()  # correctness before timing (llm.c style)
            row.max_abs_err = float((out.double() - ref_out.to(out.device)).abs().max())
            timing = time_fn(fn, dev, warmup=warmup, reps=reps)
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
            row.vs_copy = row.gbps / copy_gbps
            del loss, out
            row.peak_extra_mb = peak_extra_mb(fn, dev)
        except Exception as exc:  # report, keep benchmarking the others
            row.status = f"error: {type(exc).__name__}: {exc}"[:300]
    fill_ratios(rows)
    return {
        "benchmark": "dmd-loss",
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "cfg": cfg,
        "bytes_moved": nbytes,
        "copy_gbps": copy_gbps,
        "copy_ms": copy_t.median_ms,
        "tensor_mb": x0.numel() * x0.element_size() / 2**20,
        "machine": machine_info(dev),
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run` result."""
    title = (
        f"dmd-loss  shape={'x'.join(map(str, result['shape']))}  dtype={result['dtype']}  mode={result['mode']}  "
        f"cfg={result['cfg']}"
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
        cfg=not args.no_cfg,
        mode=args.mode,
        reps=args.reps,
        warmup=args.warmup,
    )
    return report(result, format_table(result), args.json)
