"""``dmdr-fast plan``: will a preset fit? Per-rank memory for DDP and FSDP at given GPU counts.

Nothing is downloaded or allocated: the networks are built on the meta device
(:mod:`dmdr_fast.plan.runs`). The table has one column per (parallelism, GPU count); with
``--gpu-memory`` it ends with a verdict per column and, when a column does not fit, what each of
a few changes would bring the per-rank total to (each re-planned, not guessed).
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from dmdr_fast._errors import UserError

if TYPE_CHECKING:  # torch and the config load on first use, not when the CLI builds its parser
    from dmdr_fast.plan.memory import RankMemory, RunMemory

__all__ = ["add_parser", "format_table", "parse_bytes", "parse_gpus", "run"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"141 GB"``, ``"80g"`` (GiB) → bytes.

    Raises:
        UserError: For text that is not a positive size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    unit = {"g": "gib", "m": "mib", "t": "tib", "k": "kib"}.get(unit, unit)
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r}: give a size such as 80GiB, 141GB or 24g")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_gpus(text: str) -> list[int]:
    """``"1,8,64"`` → ``[1, 8, 64]``.

    Raises:
        UserError: For a count that is not a positive integer.
    """
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 1:
        raise UserError(f"--gpus {text!r}: give GPU counts >= 1, e.g. --gpus 8 or --gpus 1,8,64")
    return gpus


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "plan", help="per-GPU memory of a preset for DDP and FSDP (meta device: no download)"
    )
    p.add_argument("--preset", required=True, help="preset name (dmdr_fast/configs/*.yaml)")
    p.add_argument("--gpus", default="1,8,64", help="GPU counts, comma-separated (default 1,8,64)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument(
        "--parallel", choices=("ddp", "fsdp", "both"), default="both", help="columns to print (default both)"
    )
    p.add_argument("--gpu-memory", default=None, help="per-GPU memory for a verdict, e.g. 80GiB")
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def format_table(name: str, run: RunMemory, columns: list[RankMemory], budget: int | None) -> str:
    """The per-rank table (GiB) with one column per (parallelism, GPU count)."""
    heads = [f"{c.parallel}x{c.gpus}" for c in columns]
    names = list(dict.fromkeys(row for c in columns for row, _ in c.rows))
    names.sort(key=lambda row: row == "activations")  # last, below the sharding rows (stable sort)
    width = max(len(n) for n in [*names, "total per GPU"]) + 2
    lines = [f"dmdr-fast plan: {name} (GiB per GPU)", "".ljust(width) + "".join(h.rjust(11) for h in heads)]
    for row in names:
        cells = [dict(c.rows).get(row) for c in columns]
        lines.append(row.ljust(width) + "".join(("-" if v is None else _gib(v)).rjust(11) for v in cells))
    lines.append("total per GPU".ljust(width) + "".join(_gib(c.total).rjust(11) for c in columns))
    if budget is not None:
        verdict = ["fits" if c.total <= budget else "NO" for c in columns]
        lines.append(f"fits {_gib(budget)}?".ljust(width) + "".join(v.rjust(11) for v in verdict))
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)


def _advice(preset: str, overrides: list[str], config: Any, column: RankMemory) -> list[str]:
    """What a few changes would bring ``column``'s per-rank total to (re-planned)."""
    from dmdr_fast.configs import load_preset
    from dmdr_fast.plan.memory import per_rank
    from dmdr_fast.plan.runs import preset_memory

    s, tr, m = config.student, config.train, config.model
    changes: list[tuple[str, str]] = []
    if not m.gradient_checkpointing:
        changes.append(("model.gradient_checkpointing=true", "recompute activations"))
    if tr.batch_size > 1:
        half = max(1, tr.batch_size // 2)
        accum = tr.grad_accum * tr.batch_size // half
        changes.append((f"train.batch_size={half}", f"with train.grad_accum={accum}: same global batch"))
    if s.kind == "lora" and s.lora.rank > 8:
        changes.append((f"student.lora.rank={s.lora.rank // 2}", "smaller LoRA"))
    if s.kind == "full":
        changes.append(("student.kind=lora", "train a LoRA instead of every weight"))
    if m.family in ("sd3", "flux", "zimage", "sdxl") and m.weights_dtype != "fp8":
        changes.append(("model.weights_dtype=fp8", "frozen teacher linears in e4m3"))
    if config.data.cache is None and m.family in ("sd3", "flux", "zimage", "sdxl"):
        changes.append(("data.cache=DIR", "dmdr-fast cache-prompts: drop the text encoders"))
    out = []
    parallels = [column.parallel] + (["fsdp"] if column.parallel == "ddp" and column.gpus > 1 else [])
    for key, why in changes:
        try:
            changed = load_preset(preset, [*overrides, key])
        except Exception as exc:  # an override the preset's validation refuses: say so, go on
            out.append(f"  --set {key}: not possible ({exc})")
            continue
        total = per_rank(preset_memory(changed), column.parallel, column.gpus).total
        out.append(f"  --set {key}: {_gib(total)} GiB ({why})")
    if len(parallels) > 1:
        total = per_rank(preset_memory(config), "fsdp", column.gpus).total
        out.append(f"  --set train.parallel=fsdp: {_gib(total)} GiB (shard teacher, trainables, states)")
    return out


def run(args: argparse.Namespace) -> int:
    """``dmdr-fast plan``: print the table; returns 0."""
    from dmdr_fast.configs import load_preset
    from dmdr_fast.plan.memory import per_rank
    from dmdr_fast.plan.runs import preset_memory

    gpus = parse_gpus(args.gpus)
    budget = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else None
    overrides = list(args.set)
    config = load_preset(args.preset, overrides)
    run_mem = preset_memory(config)
    parallels = ("ddp", "fsdp") if args.parallel == "both" else (args.parallel,)
    columns = [per_rank(run_mem, p, n) for p in parallels for n in gpus]
    tr = config.train
    print(format_table(config.name, run_mem, columns, budget))
    print(
        f"batch {tr.batch_size} per GPU x grad_accum {tr.grad_accum}; configured train.parallel: "
        f"{tr.parallel}; gradient checkpointing: {config.model.gradient_checkpointing}"
    )
    if budget is not None:
        failing = [c for c in columns if c.total > budget]
        if failing:
            worst = min(failing, key=lambda c: c.total)  # the closest miss: advice there helps most
            print(f"does not fit in {_gib(budget)} GiB at {worst.parallel}x{worst.gpus}; per-GPU total with:")
            print("\n".join(_advice(args.preset, overrides, config, worst)))
    return 0
