"""``dmdr-fast bench attention``: every available attention backend in one run (BENCHMARKS.md).

Providers:
    sdpa                 ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's choice
    sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math
                         SDPA restricted to one kernel with ``torch.nn.attention.sdpa_kernel``
    torch / xformers / triton
                         ``dmdr_fast.ops.attention`` with that backend
    fp8                  ``dmdr_fast.ops.attention_fp8`` (forward only; the Triton e4m3 kernel on a
                         GPU, the float32 emulation elsewhere — the ``impl`` column says which)

Per provider: forward and backward times (the backward timed alone, on a retained graph), TFLOP/s
with forward = 4·B·H·Lq·Lk·D flops and backward = 2.5× that, the ratio to the best SDPA kernel of
the same run, the ratio to the matmul rate of the same run (an (N×N)·(N×N) matmul in the bench
dtype), and the SQNR of the output against a float32 reference. Inputs are (B, L, H, D)
projections viewed as (B, H, L, D), the layout diffusers passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from dmdr_fast import backends, ops
from dmdr_fast.benchmarks.harness import machine_info, report, time_fn
from dmdr_fast.ops import attention, attention_fp8
from dmdr_fast.ops.reference import attention_ref

__all__ = ["BenchRow", "run", "setup"]

SDPA_KERNELS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
PROVIDERS_CUDA = ("sdpa", *SDPA_KERNELS, "xformers", "triton", "fp8")
PROVIDERS_CPU = ("sdpa", "sdpa-math", "torch", "triton", "fp8")
# (B, H, Lq, Lk, D): B·H = 32, L = 4096, D = 128; SD3-like joint attention (24 heads of 64,
# 4096 image + 333 text tokens).
SHAPES_CUDA = ((2, 16, 4096, 4096, 128), (1, 24, 4429, 4429, 64))
SHAPES_CPU = ((1, 4, 256, 256, 64),)


@dataclass
class BenchRow:
    provider: str
    shape: str = ""
    impl: str = ""
    fwd_ms: float = float("nan")
    bwd_ms: float = float("nan")
    fwd_tflops: float = float("nan")
    bwd_tflops: float = float("nan")
    fwd_vs_sdpa: float = float("nan")
    bwd_vs_sdpa: float = float("nan")
    fwd_vs_matmul: float = float("nan")
    sqnr_db: float = float("nan")
    status: str = "ok"


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int) -> tuple[float, float]:
    """(forward, backward) flops: 2 matmuls of 2·Lq·Lk·D each forward; backward 2.5× forward."""
    fwd = 4.0 * B * H * Lq * Lk * D
    return fwd, 2.5 * fwd


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int, **kw) -> float:
    """Measured (n×n)·(n×n) matmul rate in ``dtype``: the compute ceiling attention is held to."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_fn(lambda: a @ b, device, **kw)
    return 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e12


def _inputs(shape, dtype, device, pad_frac: float, seed: int = 0):
    B, H, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(seed)

    def proj(L):  # (B, L, H, D) memory, (B, H, L, D) view
        return torch.randn(B, L, H, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)

    q, k, v = proj(Lq), proj(Lk), proj(Lk)
    mask = None
    if pad_frac > 0:  # the last pad_frac of every sample's keys is padding (text padding)
        n_pad = min(Lk - 1, round(pad_frac * Lk))
        mask = torch.zeros(B, Lk, dtype=torch.bool, device=device)
        mask[:, Lk - n_pad :] = True
    return q, k, v, mask


def _sdpa_context(provider: str):
    if provider not in SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[provider]))


def _unavailable(provider: str, q: torch.Tensor, mask: torch.Tensor | None) -> str:
    op, name = ("attention_fp8", None) if provider == "fp8" else ("attention", provider)
    if provider.startswith("sdpa"):
        name = "sdpa"
    table = ops.OPS[op]
    inputs = dict(
        device=q.device, head_dim=q.shape[-1], has_mask=mask is not None,
        batch_heads=q.shape[0] * q.shape[1], row_span=q.shape[2] * q.stride(2),
    )  # fmt: skip
    if name is None:  # fp8: the automatic choice
        try:
            backends.select_backend(table, None, q.device.type, [q.dtype], **inputs)
            return ""
        except backends.BackendUnavailableError as exc:
            return str(exc).splitlines()[0]
    return "; ".join(table.impls[name].not_supported_reasons(q.device.type, [q.dtype], **inputs))


def _impl_name(provider: str, q: torch.Tensor) -> str:
    if provider != "fp8":
        return provider
    impls = ops.OPS["attention_fp8"].impls
    ok = not impls["triton"].not_supported_reasons(
        q.device.type, [q.dtype], device=q.device, head_dim=q.shape[-1], has_mask=False
    )
    return "fp8 triton" if ok else "fp8 torch emulation"


def setup(provider: str, q, k, v, mask) -> tuple[Callable[[], torch.Tensor], Callable | None]:
    """(forward, backward-or-None) zero-argument callables for ``provider``.

    The backward callable runs one forward with grad when built and then times only
    ``autograd.grad`` on the retained graph.
    """
    if provider == "fp8":
        return (lambda: attention_fp8(q, k, v, key_padding_mask=mask)), None
    backend = "sdpa" if provider.startswith("sdpa") else provider

    def fwd(q=q, k=k, v=v):
        with _sdpa_context(provider):
            return attention(q, k, v, key_padding_mask=mask, backend=backend)

    def make_bwd():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = fwd(*leaves)
        grad_out = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    return fwd, make_bwd


def _bench_shape(shape, dtype, dev, providers, pad_frac, matmul_rate, reps, warmup) -> list[BenchRow]:
    q, k, v, mask = _inputs(shape, dtype, dev, pad_frac)
    ref = attention_ref(q.float(), k.float(), v.float(), mask)
    flops_f, flops_b = attention_flops(*shape)
    tag = "x".join(map(str, shape))
    rows: list[BenchRow] = []
    for p in providers:
        row = BenchRow(p, tag, _impl_name(p, q))
        rows.append(row)
        why = _unavailable(p, q, mask)
        if why:
            row.status = "unavailable: " + why
            continue
        try:
            fwd, make_bwd = setup(p, q, k, v, mask)
            out = fwd()  # correctness before timing (llm.c style)
            row.sqnr_db = _sqnr_db(ref, out)
            del out
            t = time_fn(fwd, dev, warmup=warmup, reps=reps)
            row.fwd_ms, row.fwd_tflops = t.median_ms, flops_f / (t.median_ms * 1e-3) / 1e12
            row.fwd_vs_matmul = row.fwd_tflops / matmul_rate
            if make_bwd is not None:
                bwd = make_bwd()
                t = time_fn(bwd, dev, warmup=warmup, reps=reps)
                row.bwd_ms, row.bwd_tflops = t.median_ms, flops_b / (t.median_ms * 1e-3) / 1e12
                del bwd
        except Exception as exc:  # report, keep benchmarking the others
            row.status = f"error: {type(exc).__name__}: {exc}"[:300]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    sdpa = [r for r in rows if r.provider.startswith("sdpa") and r.status == "ok"]
    best_f = min((r.fwd_ms for r in sdpa), default=math.nan)
    best_b = min((r.bwd_ms for r in sdpa if not math.isnan(r.bwd_ms)), default=math.nan)
    for r in rows:
        r.fwd_vs_sdpa = best_f / r.fwd_ms
        r.bwd_vs_sdpa = best_b / r.bwd_ms
    return rows


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).norm()
    return math.inf if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def run(
    shapes: Sequence[Sequence[int]] | None = None,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    providers: Sequence[str] | None = None,
    pad_frac: float = 0.0,
    reps: int = 20,
    warmup: int = 3,
    matmul_n: int | None = None,
) -> dict:
    """Run the benchmark; returns a JSON-able dict with machine info and one row per shape × provider."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    cuda = dev.type == "cuda"
    shapes = [tuple(s) for s in (shapes or (SHAPES_CUDA if cuda else SHAPES_CPU))]
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    providers = list(providers or (PROVIDERS_CUDA if cuda else PROVIDERS_CPU))
    n = matmul_n or (8192 if cuda else 512)
    rate = matmul_tflops(dtype, dev, n, warmup=warmup, reps=reps)
    rows = []
    for shape in shapes:
        rows += _bench_shape(shape, dtype, dev, providers, pad_frac, rate, reps, warmup)
    return {
        "benchmark": "attention",
        "dtype": str(dtype).removeprefix("torch."),
        "pad_frac": pad_frac,
        "matmul_n": n,
        "matmul_tflops": rate,
        "machine": machine_info(dev),
        "rows": [asdict(r) for r in rows],
        "targets": _targets(rows, cuda),
    }


def _targets(rows: list[BenchRow], cuda: bool) -> list[str]:
    """The issue's targets (H100, bf16: triton fwd ≥ 0.9× / bwd ≥ 0.8× best SDPA; fp8 ≥ 1.3× triton fwd)."""
    out = [] if cuda else ["not a GPU: the lines below are a smoke check, not a measurement of the targets"]
    for shape in dict.fromkeys(r.shape for r in rows):
        by = {r.provider: r for r in rows if r.shape == shape and r.status == "ok"}
        if "triton" in by:
            t = by["triton"]
            out.append(f"{shape}: triton fwd {t.fwd_vs_sdpa:.2f}× best SDPA (target ≥ 0.9), "
                       f"bwd {t.bwd_vs_sdpa:.2f}× (target ≥ 0.8)")  # fmt: skip
            if "fp8" in by and by["fp8"].impl == "fp8 triton":
                out.append(f"{shape}: fp8 fwd {t.fwd_ms / by['fp8'].fwd_ms:.2f}× triton fwd (target ≥ 1.3)")
    return out


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run` result."""
    m = result["machine"]
    lines = [
        f"attention  dtype={result['dtype']}  pad_frac={result['pad_frac']}\n"
        f"{m.get('gpu', m['cpu'])}  threads={m['threads']}  torch {m['torch']}  triton {m['triton']}  {m['date']}\n"
        f"matmul ceiling: {result['matmul_tflops']:.2f} TFLOP/s ({result['matmul_n']}³, {result['dtype']})\n",
        f"{'shape':<20}{'provider':<16}{'fwd ms':>9}{'fwd TF/s':>10}{'×sdpa':>7}{'%mm':>6}"
        f"{'bwd ms':>9}{'bwd TF/s':>10}{'×sdpa':>7}{'SQNR dB':>9}  impl / status",
    ]
    for r in result["rows"]:
        status = r["impl"] if r["status"] == "ok" else r["status"]
        lines.append(
            f"{r['shape']:<20}{r['provider']:<16}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>10.2f}{r['fwd_vs_sdpa']:>7.2f}"
            f"{100 * r['fwd_vs_matmul']:>5.0f}%{r['bwd_ms']:>9.3f}{r['bwd_tflops']:>10.2f}{r['bwd_vs_sdpa']:>7.2f}"
            f"{r['sqnr_db']:>9.1f}  {status}"
        )
    lines += ["", *result["targets"]]
    return "\n".join(lines)


def main(args) -> int:
    """Entry point used by the CLI (``args`` from argparse)."""
    shapes = None
    if args.shape != "auto":
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shape.split(",")]
        for s in shapes:
            if len(s) != 5:
                raise SystemExit(f"--shape: expected BxHxLqxLkxD, got {'x'.join(map(str, s))}")
    result = run(
        shapes=shapes,
        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        device=args.device,
        providers=None if args.providers == "auto" else [p.strip() for p in args.providers.split(",")],
        pad_frac=args.pad_frac,
        reps=args.reps,
        warmup=args.warmup,
    )
    return report(result, format_table(result), args.json)
