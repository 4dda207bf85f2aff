"""``dmdr-fast bench step``: a DMDR iteration of our Trainer against the paper's step, same run.

The baseline, :func:`paper_iteration`, re-implements one iteration the way the authors' released
scripts do it (docs/method.md §11): the full backward-simulation rollout in the config's mode (no
pruning, G evaluated at every step; the text-to-image presets' ``final`` mode rolls out all N
steps in both implementations), the critic update, and — every R-th iteration — a fresh generator forward with
gradients, **three separate** guidance forwards (fake, cond, uncond, each with a scalar LoRA
scale; Decoupled DMD: four, cond and uncond at the CFG-augmentation sample), and the DMD loss
written out in eager PyTorch. Both run on the same networks and
optimisers; only the way the work is organised differs. Timings:

* ``cycle``: R iterations = one generator update (what a run pays per generator step);
* ``gen-iter``: only the iteration that contains the generator update (where the fused parts are).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from dmdr_fast.benchmarks.harness import machine_info, report
from dmdr_fast.benchmarks.paper_step import paper_dmd_loss, paper_generator_loss, paper_iteration
from dmdr_fast.train.trainer import Trainer

__all__ = ["paper_dmd_loss", "paper_generator_loss", "paper_iteration", "run"]


def _time_cycles(fn, tr: Trainer, cycles: int) -> tuple[list[float], list[float]]:
    """Per-cycle and per-generator-iteration wall times (ms), synchronising on GPUs."""
    R = tr.config.dmdr.ratio_update
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    cycle_ms, gen_ms = [], []
    for _ in range(cycles):
        sync()
        start = time.perf_counter()
        for i in range(R):
            if i == R - 1:
                sync()
                g0 = time.perf_counter()
            fn(tr)
        sync()
        end = time.perf_counter()
        cycle_ms.append((end - start) * 1e3)
        gen_ms.append((end - g0) * 1e3)
    return cycle_ms, gen_ms


def _runs(trainer: Trainer, twin: Trainer | None) -> list[tuple[str, Any, bool, Trainer]]:
    """(name, iteration, force eager, trainer) of each timed row: the paper's scripts do not
    compile, so their row runs eager; with ``train.compile`` our step is also timed eager (the
    compile gain); with FP8 frozen weights, ``twin`` is the same run with them in their load dtype."""
    from dmdr_fast.benchmarks.bench_step_rl import baseline_iteration  # imports this module

    ours = lambda tr: tr.step()  # noqa: E731
    rows = [("ours", ours, False, trainer), ("paper", baseline_iteration(trainer.config), True, trainer)]
    if trainer.config.train.compile:
        rows.insert(1, ("ours_eager", ours, True, trainer))
    if twin is not None:
        rows.append(("ours_" + _weights_dtype(twin), ours, False, twin))
    return rows


def _weights_dtype(tr: Trainer) -> str:
    """The dtype the guidance network's weights really have (the digits teacher ignores
    ``model.weights_dtype``, a text-to-image pipeline is loaded in it)."""
    dtype = next(p.dtype for p in tr.guidance.network.parameters() if not p.requires_grad)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _stance(eager: bool):
    return torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()


def run(
    trainer: Trainer, *, cycles: int = 10, warmup: int = 2, twin: Trainer | None = None
) -> dict[str, Any]:
    """Alternate ours and the paper's iteration on ``trainer`` (and ours on ``twin``) and report
    medians and ratios."""
    import statistics

    rows = _runs(trainer, twin)
    for _, fn, eager, tr in rows:  # with compile: the warm-up cycles also pay the compilation
        with _stance(eager):
            _time_cycles(fn, tr, warmup)
    results: dict[str, list[float]] = {f"{n}_{k}": [] for n, _, _, _ in rows for k in ("cycle", "gen")}
    for _ in range(cycles):  # interleaved so that drifting machine load hits every row alike
        for name, fn, eager, tr in rows:
            with _stance(eager):
                c, g = _time_cycles(fn, tr, 1)
            results[f"{name}_cycle"] += c
            results[f"{name}_gen"] += g
    med = {k: statistics.median(v) for k, v in results.items()}
    peak: dict[str, float | None] = {name: None for name, _, _, _ in rows}
    if trainer.device.type == "cuda":  # one more cycle each, alone, for its allocator peak
        for name, fn, eager, tr in rows:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(trainer.device)
            with _stance(eager):
                _time_cycles(fn, tr, 1)
            peak[name] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    cfg = trainer.config
    compiled = "ours_eager" in peak
    ours, paper = peak["ours"], peak["paper"]  # both None off CUDA
    hp = f"ours_{_weights_dtype(twin)}" if twin is not None else None
    fp8 = trainer.fp8
    from dmdr_fast.benchmarks.bench_step_rl import baseline_name, rl_summary

    return {
        "benchmark": "step",
        "baseline": baseline_name(cfg),  # the "paper" row: the paper's step, or the RL modes' eager baseline
        "rl": rl_summary(cfg),
        "batch_size": cfg.train.batch_size,
        "student_steps": cfg.student.num_steps,
        "ratio_update": cfg.dmdr.ratio_update,
        "guidance": cfg.dmdr.guidance,
        "decoupled": cfg.dmdr.ca_renoise if cfg.dmdr.decoupled else None,
        "compile": f"{cfg.train.compile_backend}/{cfg.train.compile_mode}" if compiled else None,
        "weights_dtype": cfg.model.weights_dtype,
        "machine": machine_info(trainer.device),
        "median_ms": med,
        "speedup_cycle": med["paper_cycle"] / med["ours_cycle"],
        "speedup_gen_iter": med["paper_gen"] / med["ours_gen"],
        "compile_speedup_cycle": med["ours_eager_cycle"] / med["ours_cycle"] if compiled else None,
        "fp8_vs": hp[len("ours_") :] if hp else None,
        "fp8_speedup_cycle": med[f"{hp}_cycle"] / med["ours_cycle"] if hp else None,
        "fp8_frozen_bytes": (fp8.bytes_before, fp8.bytes_after) if fp8 is not None else None,
        "fp8_memory_ratio": ours / hp_peak if ours and (hp_peak := peak.get(hp or "")) else None,
        "peak_mem_mib": peak,
        "memory_ratio": ours / paper if ours and paper is not None else None,
        "cycles": cycles,
    }


def format_result(r: dict[str, Any]) -> str:
    m = r["median_ms"]
    base = r.get("baseline", "paper")
    return (
        f"bench step: batch {r['batch_size']}, {r['student_steps']}-step student, R={r['ratio_update']}, "
        f"CFG {r['guidance']}{', Decoupled DMD (' + r['decoupled'] + ')' if r.get('decoupled') else ''}  ({r['machine'].get('gpu', r['machine']['cpu'])}, {r['machine']['date']})\n"
        + (f"  {r['rl']}; baseline: {base}\n" if r.get("rl") else "")
        + f"  cycle (R iterations = 1 generator update): ours {m['ours_cycle']:.1f} ms, "
        f"{base} {m['paper_cycle']:.1f} ms  → ×{r['speedup_cycle']:.2f}\n"
        f"  generator-update iteration only:            ours {m['ours_gen']:.1f} ms, "
        f"{base} {m['paper_gen']:.1f} ms  → ×{r['speedup_gen_iter']:.2f}\n"
        + (
            f"  compiled ({r['compile']}) vs our step eager:  ours {m['ours_cycle']:.1f} ms, "
            f"eager {m['ours_eager_cycle']:.1f} ms  → ×{r['compile_speedup_cycle']:.2f} per cycle\n"
            if r.get("compile")
            else ""
        )
        + (
            f"  FP8 frozen weights vs {r['fp8_vs']}:            ours {m['ours_cycle']:.1f} ms, "
            f"{r['fp8_vs']} {m['ours_' + r['fp8_vs'] + '_cycle']:.1f} ms  → ×{r['fp8_speedup_cycle']:.2f} per cycle; "
            f"quantised linears {r['fp8_frozen_bytes'][0] / 2**20:.2f} → {r['fp8_frozen_bytes'][1] / 2**20:.2f} MiB"
            + (f"; peak ×{r['fp8_memory_ratio']:.2f}" if r.get("fp8_memory_ratio") else "")
            + "\n"
            if r.get("fp8_vs")
            else ""
        )
        + (
            f"  peak memory (one cycle):                    ours {p['ours']:.0f} MiB, "
            f"{base} {p['paper']:.0f} MiB  → ×{r['memory_ratio']:.2f}"
            if (p := r["peak_mem_mib"])["ours"] is not None
            else "  peak memory: measured on CUDA only"
        )
    )


def main(args, trainer: Trainer, twin: Trainer | None = None) -> int:
    from dmdr_fast.train.runtime import deterministic_algorithms

    # Every row under the same train.deterministic setting (our step would otherwise set it alone).
    with deterministic_algorithms(trainer.config.train.deterministic):
        result = run(trainer, cycles=args.cycles, warmup=args.warmup, twin=twin)
    return report(result, format_result(result), args.json)
