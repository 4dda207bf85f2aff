"""``dmdr-fast bench sample``: images/s of few-step sampling vs the same pipeline at its usual step count.

Both sides run the SAME diffusers pipeline object (same weights, dtype, device, resolution, batch):

* ``baseline``: plain diffusers as users run the teacher — its own scheduler, its default step
  count and CFG (SD3 28 steps / CFG 7; Flux 28 / embedded guidance 3.5; Z-Image 50 / CFG 5;
  SDXL 50 / CFG 5), so two network evaluations per step where CFG is on;
* ``student``: the exported few-step scheduler (:meth:`export_scheduler`) and call arguments
  (:meth:`pipeline_call_kwargs`, no CFG) of the family's adapter, N steps.

The weights do not matter for speed, so a random-weight pipeline (``dmdr-fast make-pipeline``) of
the real size gives the same figures as the trained student. Each timed call includes text
encoding and VAE decoding (what a user waits for).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from dmdr_fast._dtypes import load_dtype_kwargs, torch_dtype
from dmdr_fast._io import check_no_code, omitted_components
from dmdr_fast.benchmarks.harness import machine_info, report
from dmdr_fast.models.families import family_of_pipeline, get_family
from dmdr_fast.models.fp8 import quantize_for_inference
from dmdr_fast.pipelines.fp8 import denoiser_of

__all__ = ["format_sides", "main", "run", "run_sides"]


def _time_calls(
    pipe: Any, kwargs: dict[str, Any], reps: int, warmup: int, device: torch.device
) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + reps):
        sync()
        start = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(i), output_type="pt")
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(
    pipeline: str,
    *,
    family: str | None = None,
    steps: int = 4,
    shift: float | None = None,
    baseline_steps: int | None = None,
    baseline_guidance: float | None = None,
    batch: int = 1,
    resolution: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    reps: int = 5,
    warmup: int = 1,
    fp8: bool = False,
) -> dict[str, Any]:
    """Time both sides (interleaved per repetition) and return images/s, ratios and peak memory.

    With ``fp8`` a third side, ``student_fp8``, runs the student's call on a copy of the denoiser
    with FP8 linears and attention (:func:`dmdr_fast.pipelines.fp8.quantize_pipeline`'s layers)."""
    from diffusers import DiffusionPipeline

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = torch_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    family = family or family_of_pipeline(pipeline)
    check_no_code(pipeline, "pipeline folder")
    parts = omitted_components(pipeline)  # e.g. an SD3 folder saved without T5
    pipe = DiffusionPipeline.from_pretrained(str(pipeline), **parts, **load_dtype_kwargs(dt)).to(dev)
    pipe.set_progress_bar_config(disable=True)
    spec = get_family(family)
    adapter = spec.adapter.from_pipeline(pipe, resolution=resolution)
    height, width = adapter.resolution
    base_steps, base_w = spec.sampling_steps, spec.sampling_guidance
    base_steps = baseline_steps or base_steps
    base_w = base_w if baseline_guidance is None else baseline_guidance
    prompts = [f"a photo of object number {i}, studio light" for i in range(batch)]
    common = {"prompt": prompts, "height": height, "width": width}
    original = pipe.scheduler
    few = adapter.export_scheduler(
        steps, shift if shift is not None else float(getattr(adapter, "shift", 1.0))
    )
    attr, net = denoiser_of(pipe)
    student_kwargs = {**common, **adapter.pipeline_call_kwargs(steps)}
    sides = {
        "baseline": (original, {**common, "num_inference_steps": base_steps, "guidance_scale": base_w}, net),
        "student": (few, student_kwargs, net),
    }
    fp8_report = None
    if fp8:
        net_fp8 = copy.deepcopy(net)
        fp8_report = quantize_for_inference(net_fp8)
        sides["student_fp8"] = (few, student_kwargs, net_fp8)
    times: dict[str, list[float]] = {k: [] for k in sides}
    peak: dict[str, float | None] = {k: None for k in sides}
    for name, (scheduler, kwargs, denoiser) in sides.items():  # warm-up (and the CUDA peak, alone)
        pipe.scheduler = scheduler
        setattr(pipe, attr, denoiser)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _time_calls(pipe, kwargs, 0, max(warmup, 1), dev)
        if dev.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(dev) / 2**20
    for _ in range(reps):  # interleaved so that drifting load hits every side alike
        for name, (scheduler, kwargs, denoiser) in sides.items():
            pipe.scheduler = scheduler
            setattr(pipe, attr, denoiser)
            times[name] += _time_calls(pipe, kwargs, 1, 0, dev)
    pipe.scheduler = original
    setattr(pipe, attr, net)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch / v for k, v in med.items()}
    return {
        "benchmark": "sample",
        "pipeline": str(pipeline),
        "family": family,
        "resolution": [height, width],
        "batch": batch,
        "dtype": str(dt).removeprefix("torch."),
        "student_steps": steps,
        "baseline_steps": base_steps,
        "baseline_guidance": base_w,
        "params_denoiser_m": sum(p.numel() for p in adapter.network.parameters()) / 1e6,
        "machine": machine_info(dev),
        "median_s": med,
        "images_per_s": ips,
        "speedup": ips["student"] / ips["baseline"],
        "fp8_speedup": ips["student_fp8"] / ips["student"] if fp8 else None,
        "fp8_linears": len(fp8_report.quantized) if fp8_report is not None else None,
        "peak_mem_mib": peak,
        "reps": reps,
    }


def run_sides(
    sides: dict[str, Any], *, batch: int, device: torch.device, reps: int = 5, warmup: int = 1, **info: Any
) -> dict[str, Any]:
    """Time callables that each make ``batch`` images (interleaved per repetition, so that drifting
    load hits every side alike) and return images/s; the first side is the baseline of the ratios.

    ``info`` is copied into the result (what the sides are, for the report)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(warmup + reps):
        for name, fn in sides.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch / v for k, v in med.items()}
    base = next(iter(sides))
    return {
        "benchmark": "sample",
        **info,
        "batch": batch,
        "machine": machine_info(device),
        "median_s": med,
        "images_per_s": ips,
        "vs_" + base: {k: v / ips[base] for k, v in ips.items()},
        "reps": reps,
    }


def format_sides(r: dict[str, Any]) -> str:
    """The report of :func:`run_sides`: one line per side with its ratio to the first."""
    base = next(iter(r["median_s"]))
    lines = [
        f"bench sample: {r.get('what', '')}, batch {r['batch']}  ({r['machine'].get('gpu', r['machine']['cpu'])}, {r['machine']['date']})"
    ]
    for name, m in r["median_s"].items():
        lines.append(
            f"  {name:<12} {m * 1e3:9.1f} ms/call, {r['images_per_s'][name]:8.3g} images/s  → ×{r['vs_' + base][name]:.2f} vs {base}"
        )
    return "\n".join(lines)


def format_result(r: dict[str, Any]) -> str:
    m, ips, peak = r["median_s"], r["images_per_s"], r["peak_mem_mib"]
    mem = (
        f"\n  peak memory: baseline {peak['baseline']:.0f} MiB, student {peak['student']:.0f} MiB"
        if peak["student"] is not None
        else ""
    )
    h, w = r["resolution"]
    return (
        f"bench sample: {r['family']} ({r['params_denoiser_m']:.0f}M-param denoiser), {h}×{w}, batch "
        f"{r['batch']}, {r['dtype']}  ({r['machine'].get('gpu', r['machine']['cpu'])}, {r['machine']['date']})\n"
        f"  baseline {r['baseline_steps']} steps, CFG {r['baseline_guidance']:g}: {m['baseline'] * 1e3:.1f} ms/call, "
        f"{ips['baseline']:.3g} images/s\n"
        f"  student  {r['student_steps']} steps, no CFG:  {m['student'] * 1e3:.1f} ms/call, "
        f"{ips['student']:.3g} images/s  → ×{r['speedup']:.1f}"
        + (
            f"\n  student  FP8 ({r['fp8_linears']} linears + attention): {m['student_fp8'] * 1e3:.1f} ms/call, "
            f"{ips['student_fp8']:.3g} images/s  → ×{r['fp8_speedup']:.2f} vs the student"
            if r.get("fp8_speedup")
            else ""
        )
        + mem
    )


def main(args: Any) -> int:
    result = run(
        args.pipeline,
        family=args.family,
        steps=args.steps if args.steps is not None else 4,
        shift=args.shift,
        baseline_steps=args.baseline_steps,
        baseline_guidance=args.baseline_guidance,
        batch=args.batch,
        resolution=args.resolution,
        dtype=args.dtype,
        device=args.device,
        reps=args.reps,
        warmup=args.warmup,
        fp8=args.fp8,
    )
    return report(result, format_result(result), args.json)
