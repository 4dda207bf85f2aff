"""``dmdr-fast`` command line: env, bench (train, sample, eval and experiment come with the Trainer)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_env(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast import __version__, backends
    from dmdr_fast._native import get_native, native_error

    print(f"dmdr_fast {__version__}   torch {torch.__version__}   python {sys.version.split()[0]}")
    native = get_native()
    if native is None:
        print(f"_C: not available — {native_error()}")
    else:
        info = native.build_info()
        print("_C build: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        count, why = native.cuda_device_count()
        print(f"CUDA devices visible to _C: {count}" + (f" ({why})" if why else ""))
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    rows = backends.availability_table()
    width = max(len(r["status"]) for r in rows)
    print(f"\n{'op':<12}{'backend':<9}{'device':<7}{'available':<{min(width, 60) + 2}}note")
    for r in rows:
        print(f"{r['op']:<12}{r['backend']:<9}{r['device']:<7}{r['status']:<{min(width, 60) + 2}}{r['note']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "dmd-loss":
        from dmdr_fast.benchmarks import bench_dmd_loss

        return bench_dmd_loss.main(args)
    raise SystemExit(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``dmdr-fast``."""
    parser = argparse.ArgumentParser(prog="dmdr-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="show build info and the ops × backends availability table")
    env.set_defaults(func=_cmd_env)

    bench = sub.add_parser(
        "bench", help="throughput benchmarks (ratios against baselines measured in the same run)"
    )
    bench_sub = bench.add_subparsers(dest="what", required=True)
    dmd = bench_sub.add_parser("dmd-loss", help="fused DMD loss vs eager, torch.compile and copy bandwidth")
    dmd.add_argument("--shape", default="8x16x128x128", help="B x ... of x0 (default 8x16x128x128)")
    dmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    dmd.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    dmd.add_argument("--providers", default="eager,compile,torch,cpp,cuda,triton", help="comma-separated")
    dmd.add_argument("--mode", default="full", choices=["full", "fwd"], help="full = loss + x0-gradient")
    dmd.add_argument("--no-cfg", action="store_true", help="no v_uncond input (guidance off)")
    dmd.add_argument("--reps", type=int, default=20)
    dmd.add_argument("--warmup", type=int, default=3)
    dmd.add_argument("--json", default=None, help="also write the result to this JSON file")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
