"""``dmdr-fast experiment NAME``: its arguments and its dispatch (digits, digits-grpo, coldstart).

Kept here rather than in ``cli.py`` so that the experiments' options live next to the code they
drive; ``cli.py`` only mounts the sub-command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmdr_fast._errors import UserError

__all__ = ["EXPERIMENTS", "add_experiment_parser", "cmd_experiment"]

#: Experiment → its default seeds.
EXPERIMENTS = {"digits": "30,31", "digits-grpo": "30,31", "coldstart": "30,31,32"}


def add_experiment_parser(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``experiment`` sub-command to ``sub`` (an argparse sub-parsers object)."""
    exp = sub.add_parser(
        "experiment",
        help="digits: teacher vs DMD-only vs DMDR vs reward-only; digits-grpo: GRPO regularised by DMD / KL / "
        "nothing; coldstart: DynaRS / DynaDG on and off in DMD-only runs",
    )
    exp.add_argument("name", help=f"experiment name ({', '.join(EXPERIMENTS)})")
    exp.add_argument("--out", required=True)
    exp.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, one run per row (arm) each; default "
        + "; ".join(f"{k} {v}" for k, v in EXPERIMENTS.items()),
    )
    exp.add_argument(
        "--preset",
        default=None,
        help="coldstart: the preset whose DMD-only run is ablated (default digits; text-to-image presets too)",
    )
    exp.add_argument(
        "--eval-steps",
        default=None,
        help="coldstart: generator steps at which every run is evaluated (default 25,50,100,150,300)",
    )
    exp.add_argument(
        "--setting",
        default=None,
        help="coldstart: default (the preset's student), reinit (last block re-initialised), 4step",
    )
    add_config_args(exp)
    exp.set_defaults(func=cmd_experiment)


def _ints(text: str, what: str) -> tuple[int, ...]:
    from dmdr_fast.recipes.digits.experiment_common import parse_seeds

    return parse_seeds(text, what)


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run the named experiment and print its table."""
    from dmdr_fast.configs import load_preset

    if args.name not in EXPERIMENTS:
        raise UserError(f"experiment {args.name!r}: unknown (available: {', '.join(EXPERIMENTS)})")
    if args.name != "coldstart":
        options = (("--preset", args.preset), ("--setting", args.setting), ("--eval-steps", args.eval_steps))
        given = [f for f, v in options if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only for `experiment coldstart`")
    seeds = _ints(args.seeds if args.seeds is not None else EXPERIMENTS[args.name], "--seeds")
    progress = not args.quiet
    if args.name == "digits":
        from dmdr_fast.recipes.digits.experiment import run_experiment

        run_experiment(
            args.out,
            load_preset("digits", list(args.set or [])),
            seeds=seeds,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    elif args.name == "digits-grpo":
        from dmdr_fast.recipes.digits.experiment_grpo import run_grpo_experiment

        run_grpo_experiment(
            args.out,
            load_preset("digits-grpo", list(args.set or [])),
            seeds=seeds,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    else:
        from dmdr_fast.recipes.digits.experiment_coldstart import (
            DEFAULT_EVAL_STEPS,
            SETTINGS,
            coldstart_config,
            run_coldstart_experiment,
        )

        setting = args.setting if args.setting is not None else "default"
        if setting not in SETTINGS:
            raise UserError(f"--setting: {setting!r} is not one of {', '.join(SETTINGS)}")
        steps = _ints(args.eval_steps, "--eval-steps") if args.eval_steps is not None else DEFAULT_EVAL_STEPS
        base = load_preset(args.preset or "digits", list(args.set or []))
        coldstart_config(base, steps, setting)  # refuses bad steps and configs before any work
        run_coldstart_experiment(
            args.out,
            base,
            seeds=seeds,
            eval_steps=steps,
            setting=setting,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    print((Path(args.out) / "table.md").read_text())
    print(f"table: {args.out}/table.md")
    return 0
