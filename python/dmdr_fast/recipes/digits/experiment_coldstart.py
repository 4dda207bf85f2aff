"""``dmdr-fast experiment coldstart``: what do DynaRS and DynaDG do for a DMD-only cold start?

Four arms of the same DMD-only run (``rewards=[]``), one per combination of the two cold-start
strategies (``dmdr.dynars``, ``dmdr.dynadg``): both on (the preset), DynaRS only, DynaDG only,
both off. Every arm trains once per seed; the digits evaluator (FD, precision, recall, accuracy,
diversity on the evaluation network; for a text-to-image preset, the comparison with the teacher
on the held-out prompts) runs at fixed generator steps, so the table and the plot
show the early steps, where the strategies are meant to act (they anneal over
``dmdr.dynamic_horizon``), next to the later ones. All steps run at stage 1's learning rates (the
cold start is what is measured: the stage-2 rates are set to stage 1's).

Settings (``--setting``): ``default`` (the preset's 1-step student, started from the teacher);
``reinit`` (the student's last transformer block re-initialised at random, the same draw for every
arm of a seed: a student that starts far from the teacher, where a stabiliser should matter most);
``4step`` (a 4-step student). docs/digits/coldstart_experiment.md says how to read the results.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from dmdr_fast._errors import UserError
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.recipes.digits.experiment_common import load_assets, mean_std, mean_std_table, slug
from dmdr_fast.recipes.digits.run import DigitsAssets, train_student, write_json

__all__ = [
    "ARMS",
    "DEFAULT_EVAL_STEPS",
    "METRICS",
    "SETTINGS",
    "T2I_METRICS",
    "coldstart_config",
    "run_coldstart_experiment",
]

#: Arm → (dmdr.dynars, dmdr.dynadg).
ARMS: dict[str, tuple[bool, bool]] = {
    "both on": (True, True),
    "DynaRS only": (True, False),
    "DynaDG only": (False, True),
    "both off": (False, False),
}
SETTINGS = ("default", "reinit", "4step")
DEFAULT_EVAL_STEPS = (25, 50, 100, 150, 300)
METRICS = ("fd", "precision", "recall", "accuracy", "diversity_ratio")
TITLES = {
    "fd": "FD ↓",
    "recall": "recall ↑",
    "fd_to_reference": "FD to the teacher ↓",
    "diversity_pixel": "diversity",
}
#: Text-to-image presets: the student's row of the teacher comparison (dmdr_fast.eval.t2i).
T2I_METRICS = ("fd_to_reference", "diversity_pixel", "diversity_feat")


def coldstart_config(base: DMDRTrainerConfig, eval_steps: tuple[int, ...], setting: str) -> DMDRTrainerConfig:
    """``base`` as the experiment's DMD-only run: no reward (nor reward-driven RL mode), as many
    steps as the last evaluation, all of them stage 1, no in-run evaluation or monitor (the
    experiment evaluates at ``eval_steps`` itself), and the ``setting``'s student."""
    if setting not in SETTINGS:
        raise UserError(f"--setting: {setting!r} is not one of {', '.join(SETTINGS)}")
    if not eval_steps or any(k < 1 for k in eval_steps) or sorted(set(eval_steps)) != list(eval_steps):
        raise UserError(f"--eval-steps: expected increasing positive steps, e.g. 25,50,100; got {eval_steps}")
    last = eval_steps[-1]
    overrides = [
        "rewards=[]",
        "rl.algorithm=none",
        f"train.max_steps={last}",
        # The cold start is what is measured: stage 1's learning rates throughout. (Not as
        # cold_start_steps = last: the segments of run_coldstart_experiment resume with shorter
        # max_steps, which must not be below cold_start_steps, and cold_start_steps may not change.)
        "dmdr.cold_start_steps=0",
        f"optim.lr_generator_stage2={base.optim.lr_generator}",
        f"optim.lr_critic_stage2={base.optim.lr_critic}",
        "train.eval_every=0",
        "monitor.every=0",
    ]
    if setting == "4step":
        overrides.append("student.num_steps=4")
    return base.with_overrides(overrides)


def _reinit_student(assets: DigitsAssets, path: Path, seed: int) -> Path:
    """The teacher's weights with the last transformer block drawn afresh (seeded), as a file for
    ``student.init``."""
    from safetensors.torch import save_file

    from dmdr_fast.models import dit_from_config

    state = {k: v.clone() for k, v in assets.teacher_state.items()}
    fresh = dit_from_config(assets.teacher_config["model"], seed=10_000 + seed).state_dict()
    last = max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    prefix = f"transformer_blocks.{last}."
    for k in state:
        if k.startswith(prefix):
            state[k] = fresh[k].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def run_coldstart_experiment(
    out_dir: str | os.PathLike[str],
    base: DMDRTrainerConfig,
    *,
    seeds: tuple[int, ...] = (30, 31, 32),
    eval_steps: tuple[int, ...] = DEFAULT_EVAL_STEPS,
    setting: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every arm of :data:`ARMS` for every seed, evaluating at ``eval_steps``.

    Args:
        out_dir: where each run (``<arm>-seed<N>/``), ``table.md``, ``curves.png`` and
            ``experiment.json`` go. A run already there is continued (resumed).
        base: a preset (any overrides); see :func:`coldstart_config`. Digits-family presets are
            evaluated by the digits evaluation network; text-to-image presets by their comparison
            with the teacher on the held-out prompts (drift FD and diversity; no real images).
        seeds: ``train.seed`` of each arm's runs (and of the ``reinit`` setting's draw).
        eval_steps: generator steps at which every run is evaluated; the last is the run's length.
        setting: ``default``, ``reinit`` or ``4step`` (module docstring).

    Returns:
        ``results``: arm → step → one metrics dict per seed; ``seeds``, ``eval_steps``, ``setting``.
    """
    from dmdr_fast.eval.plots import plot_mean_std_curves

    digits = base.model.family == "digits"
    if not digits and setting == "reinit":
        raise UserError("--setting reinit re-initialises a block of the digits DiT: use a digits preset")
    cfg0 = coldstart_config(base, eval_steps, setting)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = load_assets(cfg0, cache_dir, progress=progress) if digits else None
    results: dict[str, dict[int, list[dict[str, float]]]] = {arm: {k: [] for k in eval_steps} for arm in ARMS}
    for seed in seeds:
        extra = [f"train.seed={seed}"]
        if setting == "reinit" and assets is not None:
            extra.append(
                f"student.init={_reinit_student(assets, out / f'reinit-seed{seed}.safetensors', seed)}"
            )
        for arm, (rs, dg) in ARMS.items():
            cfg = cfg0.with_overrides(
                [*extra, f"dmdr.dynars={rs}", f"dmdr.dynadg={dg}", f"name={slug(arm)}-seed{seed}"]
            )
            # One segment per evaluation step, each continuing the previous one's checkpoint.
            for k in eval_steps:
                segment = cfg.with_overrides([f"train.max_steps={k}"])
                if assets is None:  # text-to-image: the teacher comparison after each segment
                    results[arm][k].append(_t2i_segment(segment, out / cfg.name, progress))
                    continue
                # Digits: the Trainer evaluates at the end of every fit, so its history holds
                # exactly the evaluation steps.
                trainer = train_student(segment, assets, out / cfg.name, resume=True, progress=progress)
            if assets is not None:
                by_step = {int(r["step"]): r for r in trainer.state.history}
                for k in eval_steps:
                    results[arm][k].append({m: float(v) for m, v in by_step[k].items() if m != "step"})
    # Digits: FD and recall to the real digits. Text-to-image: drift from the teacher's samples (FD
    # in CLIP features when the preset has a CLIP-like reward to embed with, else pixels) and diversity.
    metrics = METRICS if digits else T2I_METRICS
    (out / "table.md").write_text(_tables(results, eval_steps, seeds, setting, cfg0, metrics))
    shown = ["fd", "recall"] if digits else ["fd_to_reference", "diversity_pixel"]
    curves = {
        arm: {m: [(k, [r.get(m, math.nan) for r in runs]) for k, runs in steps.items()] for m in shown}
        for arm, steps in results.items()
    }
    plot_mean_std_curves(
        curves, out / "curves.png", shown, titles={m: f"{TITLES[m]} (mean ± std over seeds)" for m in shown}
    )
    summary = {
        "results": {arm: {str(k): v for k, v in steps.items()} for arm, steps in results.items()},
        "seeds": list(seeds),
        "eval_steps": list(eval_steps),
        "setting": setting,
        "real_vs_real": assets.info["real_vs_real"] if assets is not None else None,
    }
    write_json(out / "experiment.json", summary)
    return summary


def _t2i_segment(cfg: DMDRTrainerConfig, run: Path, progress: bool) -> dict[str, float]:
    """Train (or continue) a text-to-image run to ``train.max_steps``, then compare it with the
    teacher on the held-out prompts (:func:`dmdr_fast.recipes.t2i.run_t2i`, no export): the
    student's row of that comparison."""
    from dmdr_fast.recipes.t2i import run_t2i

    models = run_t2i(cfg, run, resume=True, progress=progress, export=False)["comparison"]["models"]
    row = next(v for name, v in models.items() if name.startswith("student"))
    return {k: float(v) for k, v in row.items() if not k.startswith("score_se/")}


def _tables(
    results: dict[str, dict[int, list[dict[str, float]]]],
    eval_steps: tuple[int, ...],
    seeds: tuple[int, ...],
    setting: str,
    cfg: DMDRTrainerConfig,
    metrics: tuple[str, ...],
) -> str:
    """The first metric at a glance (arms × steps), then every metric per arm and step."""
    first = metrics[0]
    head = [
        f"# Cold-start strategies, DMD only — setting `{setting}`",
        "",
        f"{cfg.student.num_steps}-step student, no reward, stage 1 learning rates throughout; DynaRS / DynaDG "
        f"anneal over the first {cfg.dmdr.dynamic_horizon} generator steps. Seeds {list(seeds)}: mean ± std "
        f"over the seeds (sample std); {cfg.train.num_eval_samples} samples per evaluation.",
        "",
        f"## {first} ↓ by generator step",
        "",
        "| arm | " + " | ".join(str(k) for k in eval_steps) + " |",
        "|" + "---|" * (len(eval_steps) + 1),
    ]
    for arm, steps in results.items():
        cells = []
        for k in eval_steps:
            vals = [r[first] for r in steps[k] if first in r and math.isfinite(r[first])]
            cells.append(mean_std(vals, digits=2) if vals else "–")
        head.append(f"| {arm} | " + " | ".join(cells) + " |")
    rows = {f"{arm}, step {k}": steps[k] for arm, steps in results.items() for k in eval_steps}
    return (
        "\n".join(head) + "\n\n## Every metric\n\n" + mean_std_table(rows, metrics, first_column="arm, step")
    )
