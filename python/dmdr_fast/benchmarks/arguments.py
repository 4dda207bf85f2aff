"""The ``dmdr-fast bench ...`` sub-commands' arguments, one block per benchmark (the CLI calls
:func:`add_bench_parsers`; each benchmark module's ``main(args)`` reads them)."""

from __future__ import annotations

import argparse

from dmdr_fast._errors import cfg_scale, int_in

__all__ = ["add_bench_parsers", "add_timing_args"]


def add_timing_args(p: argparse.ArgumentParser, reps: int, warmup: int) -> None:
    """The arguments every benchmark shares: repetitions, warm-up and the JSON record."""
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")


def add_bench_parsers(bench_sub: argparse._SubParsersAction) -> None:
    """One sub-parser per benchmark under ``dmdr-fast bench``."""

    dmd = bench_sub.add_parser("dmd-loss", help="fused DMD loss vs eager, torch.compile and copy bandwidth")
    dmd.add_argument("--shape", default="8x16x128x128", help="B x ... of x0 (default 8x16x128x128)")
    dmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    dmd.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    dmd.add_argument("--providers", default="eager,compile,torch,cpp,cuda,triton", help="comma-separated")
    dmd.add_argument("--mode", default="full", choices=["full", "fwd"], help="full = loss + x0-gradient")
    dmd.add_argument("--no-cfg", action="store_true", help="no v_uncond input (guidance off)")
    add_timing_args(dmd, 20, 3)
    rg = bench_sub.add_parser(
        "reward-grad", help="fused reward-gradient combination vs eager, torch.compile and copy bandwidth"
    )
    rg.add_argument("--shape", default="8x16x128x128", help="B x ... of the gradients (default 8x16x128x128)")
    rg.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    rg.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    rg.add_argument("--providers", default="eager,compile,torch,cpp,cuda,triton", help="comma-separated")
    rg.add_argument("--mode", default="balanced", choices=["balanced", "fixed"])
    rg.add_argument("--weight", type=float, default=1.0, help="weight of mode fixed")
    rg.add_argument("--ratio", type=float, default=1.0, help="target norm ratio of mode balanced")
    rg.add_argument("--max-weight", type=float, default=float("inf"), help="cap of mode balanced")
    rg.add_argument("--nonfinite", type=int, default=0, help="NaN entries put into g_reward")
    add_timing_args(rg, 20, 3)
    qf = bench_sub.add_parser(
        "quantize-fp8", help="row-wise FP8 quantisation vs eager, torch.compile and copy bandwidth"
    )
    qf.add_argument("--shape", default="4096x4096", help="... x K of the activations (default 4096x4096)")
    qf.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    qf.add_argument("--fp8", default="e4m3", choices=["e4m3", "e5m2"], help="float8_e4m3fn or float8_e5m2")
    qf.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    qf.add_argument("--providers", default="eager,compile,torch,cpp,cuda,triton", help="comma-separated")
    add_timing_args(qf, 20, 3)
    att = bench_sub.add_parser(
        "attention", help="attention backends (TFLOP/s) vs the best SDPA kernel and the matmul rate"
    )
    att.add_argument(
        "--shape",
        default="auto",
        help="comma-separated BxHxLqxLkxD (auto: 2x16x4096x4096x128,1x24x4429x4429x64 on CUDA, 1x4x256x256x64 on CPU)",
    )
    att.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="auto: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    att.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    att.add_argument(
        "--providers",
        default="auto",
        help="comma-separated: sdpa, sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math, torch, xformers, triton, fp8",
    )
    att.add_argument("--pad-frac", type=float, default=0.0, help="fraction of keys marked as padding (mask)")
    add_timing_args(att, 20, 3)
    step = bench_sub.add_parser("step", help="a DMDR iteration of the Trainer vs the paper's eager step")
    step.add_argument(
        "--preset", default=None, help="default: digits, or the family's preset with --pipeline"
    )
    step.add_argument("--pipeline", default=None, help="a text-to-image pipeline folder (sets model.path)")
    step.add_argument(
        "--family", default=None, help="with --pipeline: sd3, flux, zimage, sdxl (default: detected)"
    )
    step.add_argument("--set", action="append", metavar="KEY=VALUE")
    step.add_argument("--cycles", type=int, default=10, help="timed generator cycles per implementation")
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--json", default=None)
    bs = bench_sub.add_parser(
        "sample",
        help="images/s of the few-step student vs the pipeline at its usual step count (plain diffusers)",
    )
    bs.add_argument("--pipeline", default=None, help="a text-to-image pipeline folder")
    bs.add_argument("--checkpoint", default=None, help="a digits checkpoint (student vs the 50-step teacher)")
    bs.add_argument("--cache-dir", default=None, help="digits: the teacher/classifier cache")
    bs.add_argument("--family", default=None, help="sd3, flux, zimage, sdxl (default: detected)")
    bs.add_argument(
        "--steps", type=int_in(1), default=None, help="student steps (default: 4; digits: the student's)"
    )
    bs.add_argument("--shift", type=float, default=None, help="student grid shift (default: the scheduler's)")
    bs.add_argument(
        "--baseline-steps", type=int_in(1), default=None, help="default: the family's usual count"
    )
    bs.add_argument(
        "--baseline-guidance", type=cfg_scale, default=None, help="default: the family's usual CFG"
    )
    bs.add_argument("--batch", type=int, default=1, help="prompts per call")
    bs.add_argument("--resolution", type=int, default=None, help="image side (default: the pipeline's)")
    bs.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA"
    )
    bs.add_argument("--device", default="auto")
    bs.add_argument("--fp8", action="store_true", help="also time the student with FP8 linears and attention")
    add_timing_args(bs, 5, 1)
