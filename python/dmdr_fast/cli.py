"""``dmdr-fast`` command line: train, sample, eval, experiment, bench, env, check-kernels."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from dmdr_fast._errors import (
    OneLineParser,
    UserError,
    bug_report,
    cfg_scale,
    check_device,
    check_writable_file,
    int_in,
)

if TYPE_CHECKING:
    from dmdr_fast.train.trainer import Trainer

__all__ = ["main"]

#: --cache-dir's help (digits: where trained teachers and classifiers are kept).
CACHE_HELP = "digits teacher/classifier cache (default: $DMDR_FAST_CACHE, else ~/.cache/dmdr_fast)"


def _cmd_env(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast import __version__, ops
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
    rows = ops.availability_table()
    width = min(max(len(r["status"]) for r in rows), 60) + 2
    op_w = max(len(r["op"]) for r in [*rows, {"op": "op"}]) + 2
    print(f"\n{'op':<{op_w}}{'backend':<9}{'device':<7}{'available':<{width}}  note")
    for r in rows:
        print(f"{r['op']:<{op_w}}{r['backend']:<9}{r['device']:<7}{r['status']:<{width}}  {r['note']}")
    return 0


def _cmd_check_kernels(args: argparse.Namespace) -> int:
    from dmdr_fast.ops import triton_aot

    return triton_aot.run_from_args(args)


def _config_from_args(args: argparse.Namespace):
    from dmdr_fast.config import DMDRTrainerConfig
    from dmdr_fast.configs import load_preset

    if (args.preset is None) == (args.config is None):
        raise SystemExit("give exactly one of --preset NAME or --config FILE")
    overrides = list(args.set or [])
    if args.preset is not None:
        return load_preset(args.preset, overrides)
    return DMDRTrainerConfig.load_yaml(args.config, overrides=overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from dmdr_fast.train import distributed

    distributed.init_from_env()  # under torchrun: one process per GPU
    try:
        return _train(args)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace) -> int:
    from dmdr_fast.train import run_dir
    from dmdr_fast.train.runtime import check_runnable, deterministic_algorithms

    config = _config_from_args(args)
    check_runnable(config.train)  # CUDA, attention and kernel backends: before any slow work
    # train.deterministic covers the whole run here (teacher samples, evaluation, export too).
    with (
        run_dir.claim(args.out, resume=args.resume, overwrite=args.overwrite),
        deterministic_algorithms(config.train.deterministic),
    ):
        return _run_training(args, config)


def _run_training(args: argparse.Namespace, config) -> int:
    from dmdr_fast.recipes import digits, t2i

    if config.model.family in t2i.T2I_FAMILIES:
        metrics = t2i.run_t2i(config, args.out, resume=args.resume, progress=not args.quiet)
        if "rank" in metrics:
            return 0
        for name, row in metrics["comparison"]["models"].items():
            print(
                f"{name}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.startswith("score_se/"))
            )
        if metrics["export"]:
            print(f"exported student: {metrics['export']}")
        print(f"report: {args.out}/report.md")
        return 0
    if config.model.family != "digits":
        raise SystemExit(
            f"model.family={config.model.family!r}: `dmdr-fast train` runs the digits teacher ('digits') and "
            f"the text-to-image families {list(t2i.T2I_FAMILIES)}"
        )
    metrics = digits.run_digits(
        config, args.out, cache_dir=args.cache_dir, resume=args.resume, progress=not args.quiet
    )
    if "rank" in metrics:
        return 0
    for name, row in metrics["results"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    print(f"report: {args.out}/report.md")
    return 0


def _load_trainer(checkpoint: str, cache_dir: str | None):
    """``bench sample``'s Trainer for a digits checkpoint, with the teacher it is timed against
    (cached or trained); ``sample`` and ``eval`` train nothing (``recipes.digits.checkpoints``)."""
    from dmdr_fast.config import DMDRTrainerConfig
    from dmdr_fast.recipes import digits
    from dmdr_fast.train.checkpoint import is_sharded_checkpoint, open_checkpoint
    from dmdr_fast.train.trainer import ClassLabelSampler, Trainer

    sd = open_checkpoint(checkpoint)  # weights_only: a downloaded checkpoint runs no code
    # Sampling/evaluating a checkpoint: its weights come from the checkpoint (no student.init to
    # read again) and nothing is worth compiling.
    overrides = ["train.device=cpu", "student.init=null", "train.compile=false"]
    config = DMDRTrainerConfig.from_dict(sd["config"]).with_overrides(overrides)
    assets = digits.prepare_assets(
        cache_dir if cache_dir is not None else digits.default_cache_dir(),
        config.model.kwargs.get("teacher"),
        config.model.kwargs.get("classifiers"),
        progress=False,
    )
    trainer = Trainer(
        config,
        assets.fresh_teacher(),
        reward=digits.make_reward(assets, config.rewards),
        data=ClassLabelSampler(10),
    )
    if is_sharded_checkpoint(checkpoint):  # an FSDP run's folder: DCP reads it into 1 process
        trainer.resume(checkpoint)
    else:
        trainer.load_state_dict(sd)
    return trainer, assets


def _cmd_sample_pipeline(args: argparse.Namespace) -> int:
    import math

    from dmdr_fast.eval.plots import IMAGE_SUFFIXES, save_image_grid
    from dmdr_fast.pipelines.export import check_exported, load_exported, sample_exported
    from dmdr_fast.train.runtime import resolve_device

    check_writable_file(args.out, "--out", IMAGE_SUFFIXES)  # before the slow load, not after
    check_exported(args.pipeline, lora=args.lora)
    device = resolve_device(check_device(args.device))
    prompts = list(args.prompt or [])
    if args.prompts_file:
        from dmdr_fast.data.prompts import load_prompts

        prompts += load_prompts(args.prompts_file)
    if not prompts:
        raise SystemExit("give --prompt TEXT (repeatable) or --prompts-file FILE")
    prompts = [p for p in prompts for _ in range(args.per_prompt)]
    pipe, info = load_exported(args.pipeline, lora=args.lora, device=device)
    if not info:
        print("note: no dmdr_export.json found; sampling with the pipeline's own defaults")
    if args.fp8:
        from dmdr_fast.pipelines.fp8 import quantize_pipeline

        print(quantize_pipeline(pipe).summary())
    images = sample_exported(
        pipe, info, prompts, steps=args.steps, seed=args.seed, height=args.height, width=args.width
    )
    save_image_grid(images.cpu(), args.out, nrow=args.nrow or max(1, int(math.sqrt(len(prompts)))), scale=1)
    steps = args.steps or info.get("num_steps", "default")
    print(f"wrote {len(prompts)} images ({steps} steps) to {args.out}")
    return 0


def _cmd_cache_prompts(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast._dtypes import torch_dtype
    from dmdr_fast.data.prompt_cache import build_prompt_cache
    from dmdr_fast.data.prompts import load_prompts
    from dmdr_fast.recipes import t2i
    from dmdr_fast.train.runtime import resolve_device

    config = _t2i_config(args)
    if config.data.prompts is None:
        raise SystemExit("give --prompts FILE (or data.prompts in the config)")
    prompts = load_prompts(config.data.prompts, column=config.data.column, limit=args.limit)
    device = resolve_device(check_device(args.device))
    adapter = t2i.build_adapter(config.model, device=device)
    dtype = torch_dtype(args.dtype)
    # Padded text embeddings are large (SD3 ~1.7 MB, Flux ~4 MB per prompt in fp32): say so first.
    sample = adapter.encode_condition(prompts[:1])
    per_prompt = sum(
        v.numel()
        * (
            torch.empty((), dtype=dtype or v.dtype).element_size()
            if v.is_floating_point()
            else v.element_size()
        )
        for v in vars(sample).values()
        if isinstance(v, torch.Tensor)
    )
    print(
        f"{len(prompts)} prompts × {per_prompt / 2**20:.2f} MiB ≈ {len(prompts) * per_prompt / 2**30:.2f} GiB on disk"
    )
    path = build_prompt_cache(
        adapter,
        prompts,
        args.out,
        batch_size=args.batch_size,
        dtype=dtype,
        progress=not args.quiet,
        model_id=t2i.model_identity(config.model.path),
        overwrite=args.overwrite,
        settings=t2i.encoding_settings(config.model),
    )
    print(f"prompt cache: {path} ({len(prompts)} prompts); train with --set data.cache={path}")
    return 0


def _cmd_ode_pairs(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast._dtypes import torch_dtype
    from dmdr_fast.data.prompts import load_prompts
    from dmdr_fast.models.families import get_family
    from dmdr_fast.recipes import t2i
    from dmdr_fast.train.ode_init import generate_ode_pairs
    from dmdr_fast.train.runtime import resolve_device

    config = _t2i_config(args)
    device = resolve_device(check_device(args.device))
    guidance = config.dmdr.guidance if args.guidance is None else args.guidance
    model_id = t2i.model_identity(config.model.path)
    if config.model.family == "digits":  # the class-conditional demo: balanced labels, cached teacher
        from dmdr_fast.recipes import digits

        assets = digits.prepare_assets(
            args.cache_dir or digits.default_cache_dir(),
            config.model.kwargs.get("teacher"),
            progress=not args.quiet,
        )
        adapter = assets.fresh_teacher().to(device)
        conditions: torch.Tensor | list[str] = digits.balanced_labels(args.limit or 2000)
        steps = args.teacher_steps or 50
    else:
        if config.data.prompts is None:
            raise SystemExit("give --prompts FILE (or data.prompts in the config): the pairs' prompts")
        conditions = load_prompts(config.data.prompts, column=config.data.column, limit=args.limit)
        adapter = t2i.build_adapter(config.model, device=device)
        steps = args.teacher_steps or get_family(config.model.family).sampling_steps
    path = generate_ode_pairs(
        adapter,
        conditions,
        args.out,
        steps=steps,
        guidance=guidance,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=torch_dtype(args.dtype),
        model_id=model_id,
        autocast=torch.bfloat16 if config.train.precision == "bf16" and device.type == "cuda" else None,
        progress=not args.quiet,
    )
    print(
        f"ODE pairs: {path} ({len(conditions)} pairs, teacher {steps} Euler steps, CFG {guidance:g}); "
        f"train with --set student.ode_init={path}"
    )
    return 0


def _t2i_config(args: argparse.Namespace):
    """The config of a text-to-image command: --preset/--config, or just --pipeline (+ --family)."""
    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes import t2i

    overrides = list(args.set or [])
    if getattr(args, "pipeline", None):
        overrides.insert(0, f"model.path={args.pipeline}")
    if getattr(args, "prompts", None):
        overrides.insert(0, f"data.prompts={args.prompts}")
    if args.preset is None and args.config is None:
        if not getattr(args, "pipeline", None):
            raise SystemExit("give --preset NAME, --config FILE or --pipeline DIR")
        family = args.family or t2i.family_of_pipeline(args.pipeline)
        return load_preset(t2i.default_preset(family), overrides)
    args.set = overrides
    return _config_from_args(args)


def _cmd_make_pipeline(args: argparse.Namespace) -> int:
    from dmdr_fast._dtypes import torch_dtype
    from dmdr_fast.pipelines.random import save_random_pipeline

    dtype = torch_dtype(args.dtype)
    out = save_random_pipeline(args.family, args.size, args.out, seed=args.seed, dtype=dtype)
    print(f"random {args.size} {args.family} pipeline: {out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dmdr_fast.eval.plots import save_image_grid

    if args.pipeline is not None:
        return _cmd_sample_pipeline(args)
    if args.checkpoint is None:
        raise SystemExit(
            "give --checkpoint FILE (digits) or --pipeline DIR (an exported text-to-image student)"
        )
    from dmdr_fast.eval.plots import IMAGE_SUFFIXES
    from dmdr_fast.recipes.digits.checkpoints import load_student
    from dmdr_fast.recipes.digits.run import default_cache_dir

    check_writable_file(args.out, "--out", (*IMAGE_SUFFIXES, ".npz"))  # before the slow load
    device = check_device(args.device)  # train.device of the sampling Trainer: auto, cpu, cuda[:N]
    trainer = load_student(args.checkpoint, args.cache_dir or default_cache_dir(), device=device)
    if args.fp8:
        from dmdr_fast.models.fp8 import quantize_for_inference

        print(quantize_for_inference(trainer.student.network).summary())
    labels = torch.full((args.num,), args.label) if args.label is not None else torch.arange(args.num) % 10
    x = trainer.sample(labels, num_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    images = trainer.student.decode(x).clamp(0, 1).cpu()
    if args.out.endswith(".npz"):
        np.savez(args.out, images=images.numpy().astype(np.float32), labels=labels.numpy())
    else:
        save_image_grid(images, args.out, nrow=10)
    print(f"wrote {args.num} samples ({args.steps or trainer.config.student.num_steps} steps) to {args.out}")
    return 0


def _cmd_eval_pipeline(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast._dtypes import torch_dtype
    from dmdr_fast.data.prompts import load_prompts
    from dmdr_fast.pipelines.evaluate import evaluate_exported, write_evaluation
    from dmdr_fast.rewards import CompositeReward, build_reward
    from dmdr_fast.train.runtime import resolve_device

    if args.out is None:
        raise SystemExit("give --out DIR (eval.json, eval.md and teacher_vs_student.png go there)")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file, limit=args.limit)
    if not prompts:
        raise SystemExit(
            "give --prompt TEXT (repeatable) or --prompts-file FILE: held-out evaluation prompts"
        )
    device = resolve_device(check_device(args.device))
    dtype = (
        torch_dtype(args.dtype)
        if args.dtype != "auto"
        else (torch.bfloat16 if device.type == "cuda" else None)
    )
    rewards = []
    for spec in args.reward or []:
        kind, sep, path = spec.partition("=")
        if not sep or not path:
            raise SystemExit(f"--reward {spec!r}: expected KIND=PATH, e.g. clip=/models/clip-vit-l-14")
        rewards.append(build_reward(kind.strip(), path=path, device=device))
    result, images = evaluate_exported(
        args.pipeline,
        prompts,
        student=args.student,
        lora=args.lora,
        per_prompt=args.per_prompt,
        rewards=CompositeReward(rewards) if rewards else None,
        teacher_steps=args.teacher_steps,
        teacher_guidance=args.teacher_guidance,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        device=device,
        dtype=dtype,
        reference_images=args.reference_images,
        reference_limit=args.reference_limit,
    )
    print(write_evaluation(args.out, result, images, args.per_prompt))
    print(f"wrote {args.out}/eval.json, eval.md, teacher_vs_student.png")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from dmdr_fast.recipes import digits

    if args.pipeline is not None:
        return _cmd_eval_pipeline(args)
    if args.checkpoint is None:
        raise SystemExit(
            "give --checkpoint FILE (digits) or --pipeline DIR with --student/--lora (text-to-image)"
        )
    from dmdr_fast.recipes.digits.checkpoints import evaluation_assets, load_student

    cache_dir = args.cache_dir or digits.default_cache_dir()
    # Sampling trains nothing, nor does eval (but the classifiers, seconds, when they are missing).
    trainer = load_student(args.checkpoint, cache_dir, device=check_device(args.device))
    assets = evaluation_assets(trainer.config, cache_dir)
    labels = digits.balanced_labels(args.num)
    x = trainer.sample(labels, num_steps=args.steps, generator=torch.Generator().manual_seed(4321))
    metrics = digits.evaluate_images(assets, trainer.student.decode(x), labels)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "dmd-loss":
        from dmdr_fast.benchmarks import bench_dmd_loss

        return bench_dmd_loss.main(args)
    if args.what == "attention":
        from dmdr_fast.benchmarks import bench_attention

        return bench_attention.main(args)
    if args.what == "reward-grad":
        from dmdr_fast.benchmarks import bench_reward_grad

        return bench_reward_grad.main(args)
    if args.what == "quantize-fp8":
        from dmdr_fast.benchmarks import bench_quantize_fp8

        return bench_quantize_fp8.main(args)
    if args.what == "sample":
        from dmdr_fast.benchmarks import bench_sample

        if args.checkpoint is None:
            return bench_sample.main(args)  # --pipeline
        from dmdr_fast.benchmarks.harness import report
        from dmdr_fast.recipes.digits.run import sampling_sides

        trainer, assets = _load_trainer(args.checkpoint, args.cache_dir)
        sides = sampling_sides(trainer, assets, batch=args.batch, steps=args.steps, fp8=args.fp8)
        what = f"digits {args.checkpoint}, student {args.steps or trainer.config.student.num_steps} steps"
        r = bench_sample.run_sides(
            sides, batch=args.batch, device=trainer.device, reps=args.reps, warmup=args.warmup, what=what
        )
        return report(r, bench_sample.format_sides(r), args.json)
    if args.what == "step":
        from dmdr_fast.benchmarks import bench_step

        trainer = _step_trainer(args, [])
        # FP8 frozen weights: the same step with the weights in their load dtype, timed alongside.
        twin = (
            _step_trainer(args, [f"model.weights_dtype={trainer.config.model.load_dtype}"])
            if trainer.fp8
            else None
        )
        return bench_step.main(args, trainer, twin=twin)
    raise SystemExit(f"unknown benchmark {args.what!r}")


def _step_trainer(args: argparse.Namespace, extra: list[str]) -> Trainer:
    """``bench step``'s Trainer: the preset without rewards (the paper baseline has none; a reward
    adds the same to both) on a random teacher of the preset's size (timing ignores the weights).
    With ``rl.algorithm`` set the rewards are kept: the group-relative modes score them (both sides)."""
    fixed = ["dmdr.cold_start_steps=0", "train.tensorboard=false"]
    if args.pipeline is not None:
        from dmdr_fast.recipes import t2i

        args.config = None
        config = _t2i_config(args)
        no_rewards = [] if config.rl.enabled else ["rewards=[]"]
        return t2i.bench_trainer(config.with_overrides([*no_rewards, *fixed, "monitor.every=0", *extra]))
    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes.digits.run import bench_trainer

    overrides = [*fixed, *(args.set or []), *extra]
    config = load_preset(args.preset or "digits", overrides)
    if not config.rl.enabled:
        config = load_preset(args.preset or "digits", ["rewards=[]", *overrides])
    return bench_trainer(config)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``dmdr-fast``."""
    parser = OneLineParser(prog="dmdr-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="show build info and the ops × backends availability table")
    env.set_defaults(func=_cmd_env)

    check = sub.add_parser(
        "check-kernels",
        help="compile every Triton kernel configuration for GPU targets, no GPU needed (registers, spills)",
    )
    check.add_argument("--target", default="sm_90,sm_80", help="comma-separated CUDA targets")
    check.add_argument(
        "--kernels", default=None, help="comma-separated kernel modules (default: all registered)"
    )
    check.add_argument(
        "--match", default=None, help="only launches whose 'kernel configuration' contains this"
    )
    check.add_argument(
        "--scope", default="all", choices=["ci", "all", "full"],
        help="ci: the subset CI compiles; all: every configuration at representative shapes; "
        "full: every ITERS / NBLK_P2 / shape-flag value too (hours)",
    )  # fmt: skip
    check.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPU count)")
    check.add_argument("--out", default=None, help="also write the markdown table to this file")
    check.set_defaults(func=_cmd_check_kernels)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
        )
        p.add_argument("--cache-dir", default=None, help=CACHE_HELP)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="run DMDR (e.g. --preset digits) and write a report")
    train.add_argument("--preset", default=None, help="a named preset, e.g. digits")
    train.add_argument("--config", default=None, help="a YAML config file")
    train.add_argument("--out", required=True, help="output folder (logs, checkpoints, samples, report)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--overwrite", action="store_true", help="delete the run already in --out, start over")
    add_config_args(train)
    train.set_defaults(func=_cmd_train)

    from dmdr_fast.recipes.digits.experiment_cli import add_experiment_parser

    add_experiment_parser(sub, add_config_args)  # digits, digits-grpo, coldstart: their options live there

    sample = sub.add_parser(
        "sample", help="sample a digits checkpoint, or an exported text-to-image student (--pipeline)"
    )
    sample.add_argument("--checkpoint", default=None, help="a digits training checkpoint")
    sample.add_argument(
        "--pipeline", default=None, help="an exported pipeline folder, or the teacher's folder with --lora"
    )
    sample.add_argument(
        "--lora", default=None, help="an exported LoRA folder (with --pipeline = the teacher)"
    )
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sample.add_argument("--prompts-file", default=None, help="prompts from a .txt/.jsonl/.csv file")
    sample.add_argument("--per-prompt", type=int_in(1), default=1, help="images per prompt")
    sample.add_argument("--height", type=int_in(1), default=None, help="image height (default: the export's)")
    sample.add_argument(
        "--width", type=int_in(1), default=None, help="image width (default: --height or the export's)"
    )
    sample.add_argument("--nrow", type=int_in(1), default=None, help="grid columns (default: about √images)")
    sample.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    sample.add_argument("--steps", type=int_in(1), default=None, help="steps (default: the student's)")
    sample.add_argument("--num", type=int_in(1), default=100, help="digits: number of samples")
    sample.add_argument("--label", type=int_in(0, 9), default=None, help="one class for all (default: cycle)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed")
    sample.add_argument(
        "--out", required=True,
        help="a grid (.png, .jpg, .webp) or, digits only, .npz (images (M,C,H,W) in [0,1], labels)",
    )  # fmt: skip
    sample.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    sample.add_argument(
        "--fp8", action="store_true", help="the student's linears and attention in FP8 (docs/fp8.md)"
    )
    sample.set_defaults(func=_cmd_sample)

    cache = sub.add_parser(
        "cache-prompts",
        help="encode prompts once into a safetensors cache (text encoders not needed in training)",
    )
    cache.add_argument("--preset", default=None, help="a text-to-image preset (its model section is used)")
    cache.add_argument("--config", default=None, help="a YAML config file")
    cache.add_argument("--pipeline", default=None, help="the pipeline folder (sets model.path)")
    cache.add_argument(
        "--family", default=None, help="with --pipeline alone: sd3, flux, zimage, sdxl (default: detected)"
    )
    cache.add_argument("--prompts", default=None, help="prompt file (sets data.prompts)")
    cache.add_argument("--out", required=True, help="cache folder")
    cache.add_argument("--batch-size", type=int, default=16)
    cache.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="storage dtype (auto: as encoded)",
    )
    cache.add_argument("--limit", type=int, default=None, help="cache only the first N prompts")
    cache.add_argument("--device", default="auto")
    cache.add_argument("--overwrite", action="store_true", help="replace a cache built for something else")
    add_config_args(cache)
    cache.set_defaults(func=_cmd_cache_prompts)

    ode = sub.add_parser(
        "ode-pairs",
        help="teacher ODE pairs (noise → teacher sample) for the student's ODE-regression init (student.ode_init)",
    )
    ode.add_argument("--preset", default=None, help="a preset (e.g. sdxl-1step; digits: balanced labels)")
    ode.add_argument("--config", default=None, help="a YAML config file")
    ode.add_argument("--pipeline", default=None, help="the teacher's pipeline folder (sets model.path)")
    ode.add_argument("--family", default=None, help="with --pipeline alone: sd3, flux, zimage, sdxl")
    ode.add_argument("--prompts", default=None, help="prompt file (sets data.prompts); one pair per prompt")
    ode.add_argument(
        "--limit",
        type=int,
        default=None,
        help="the first N prompts (DMD2/DMDR SDXL: 10000); digits: N labels (2000)",
    )
    ode.add_argument(
        "--teacher-steps", type=int_in(1), default=None, help="Euler steps (default: the family's usual)"
    )
    ode.add_argument("--guidance", type=cfg_scale, default=None, help="teacher CFG (default: dmdr.guidance)")
    ode.add_argument("--batch-size", type=int, default=8)
    ode.add_argument("--seed", type=int, default=0)
    ode.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="storage dtype"
    )
    ode.add_argument("--device", default="auto")
    ode.add_argument("--out", required=True, help="the pairs folder")
    add_config_args(ode)
    ode.set_defaults(func=_cmd_ode_pairs)

    make = sub.add_parser(
        "make-pipeline", help="write a random-weight pipeline built from a config (tests, benchmarks)"
    )
    make.add_argument("--family", required=True, help="sd3, flux, zimage, sdxl")
    make.add_argument("--size", default="tiny", help="tiny (all families) or sd35-medium (sd3)")
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="saved weights dtype")
    make.set_defaults(func=_cmd_make_pipeline)

    ev = sub.add_parser(
        "eval",
        help="metrics of a trained student: digits checkpoint (FD, precision/recall, accuracy...) or an "
        "exported text-to-image student vs its teacher (--pipeline)",
    )
    ev.add_argument("--checkpoint", default=None, help="a digits training checkpoint")
    ev.add_argument("--steps", type=int_in(1), default=None, help="student steps (default: the student's)")
    ev.add_argument("--num", type=int_in(1), default=1000, help="digits: number of samples")
    ev.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    ev.add_argument("--pipeline", default=None, help="text-to-image: the teacher's pipeline folder")
    ev.add_argument("--student", default=None, help="an exported full-student pipeline folder")
    ev.add_argument("--lora", default=None, help="an exported LoRA folder (applied to --pipeline)")
    ev.add_argument("--prompt", action="append", help="an evaluation prompt (repeatable)")
    ev.add_argument("--prompts-file", default=None, help="evaluation prompts (.txt/.jsonl/.csv), held out")
    ev.add_argument("--limit", type=int, default=None, help="use the first N prompts of the file")
    ev.add_argument("--per-prompt", type=int_in(1), default=4, help="samples per prompt (diversity needs 2)")
    ev.add_argument(
        "--reward", action="append", metavar="KIND=PATH",
        help="score with a reward model, e.g. clip=/models/clip, hps=/models/hps.pt (repeatable)",
    )  # fmt: skip
    ev.add_argument(
        "--reference-images", default=None, metavar="DIR",
        help="a folder of real images: FD and MMD² (CMMD recipe) to them, in CLIP features with a clip reward",
    )  # fmt: skip
    ev.add_argument("--reference-limit", type=int, default=None, help="use at most N reference images")
    ev.add_argument("--teacher-steps", type=int_in(1), default=None, help="default: the family's usual count")
    ev.add_argument(
        "--teacher-guidance", type=cfg_scale, default=None, help="default: the family's usual value"
    )
    ev.add_argument("--batch", type=int_in(1), default=4, help="prompts per pipeline call")
    ev.add_argument("--seed", type=int, default=0, help="noise seed (chunk i: seed + i, both models)")
    ev.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda[:N]")
    ev.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on CUDA, else as saved",
    )
    ev.add_argument("--out", default=None, help="text-to-image: folder for eval.json, eval.md and the grid")
    ev.set_defaults(func=_cmd_eval)

    bench = sub.add_parser(
        "bench", help="throughput benchmarks (ratios against baselines measured in the same run)"
    )
    from dmdr_fast.benchmarks.arguments import add_bench_parsers

    add_bench_parsers(bench.add_subparsers(dest="what", required=True))
    bench.set_defaults(func=_cmd_bench)
    from dmdr_fast.plan import command as plan_command

    plan_command.add_parser(sub).set_defaults(func=plan_command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code: 2 for a user's mistake (one line naming it), 130
    after a signal, 1 for a bug (one line; the traceback with ``--debug``)."""
    from dmdr_fast._io import UnsafeFileError
    from dmdr_fast.config import ConfigError
    from dmdr_fast.train.interrupt import EXIT_CODE, TrainingInterrupted, resume_command

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"dmdr-fast: configuration error: {exc}", file=sys.stderr)
        return 2
    except (UnsafeFileError, UserError) as exc:  # e.g. a file only code execution could read, a bad --out
        print(f"dmdr-fast: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # a signal: the checkpoint is written, say how to go on
        how = f"\nresume with: {resume_command(argv)}" if args.command == "train" else ""
        print(f"dmdr-fast: {exc}{how}", file=sys.stderr)
        return EXIT_CODE
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C outside the loop / a second signal; a bug
        if getattr(args, "debug", False):
            raise
        if isinstance(exc, KeyboardInterrupt):
            print("dmdr-fast: interrupted", file=sys.stderr)
            return EXIT_CODE
        print(bug_report(exc), file=sys.stderr)  # the traceback helps only its fixer: --debug
        return 1


def entry() -> None:
    """The ``dmdr-fast`` executable: :func:`main`, then exit with its code.

    After a signal (exit code 130) the process ends with ``os._exit`` once stdout/stderr are
    flushed: CPython 3.11 re-raises SIGINT on itself at exit when a KeyboardInterrupt went through
    a nested ``PyRun_*`` call (C-level code running Python during an import), even though
    :func:`main` handled it — the shell would see "killed by SIGINT" instead of 130. Everything a
    run writes is on disk by then (checkpoints and JSONL lines closed, the TensorBoard writer
    flushed by ``Trainer.fit``)."""
    import os

    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
