"""``dmdr-fast experiment coldstart``: what do DynaRS and DynaDG do for a DMD-only cold start?

Four arms of the same DMD-only run (``rewards=[]``), one per combination of the two cold-start
strategies (``dmdr.dynars``, ``dmdr.dynadg``): both on (the preset), DynaRS only, DynaDG only,
both off. Every arm trains once per seed; the digits evaluator (FD, precision, recall, accuracy,
diversity on the evaluation network) runs at fixed generator steps, so the table and the plot
show the early steps, where the strategies are meant to act (they anneal over
``dmdr.dynamic_horizon``), next to the later ones. All steps run at stage 1's learning rates (the
cold start is what is measured: the stage-2 rates are set to stage 1's).

Settings (``--setting``): ``default`` (the preset's 1-step student, started from the teacher);
``reinit`` (the student's last transformer block re-initialised at random, the same draw for every
arm of a seed: a student that starts far from the teacher, where a stabiliser should matter most);
``4step`` (a 4-step student). docs/digits/coldstart_experiment.md says how to read the results.
"""

from __future__ import annotations

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
        base: a digits-family preset (any overrides); see :func:`coldstart_config`.
        seeds: ``train.seed`` of each arm's runs (and of the ``reinit`` setting's draw).
        eval_steps: generator steps at which every run is evaluated; the last is the run's length.
        setting: ``default``, ``reinit`` or ``4step`` (module docstring).

    Returns:
        ``results``: arm → step → one metrics dict per seed; ``seeds``, ``eval_steps``, ``setting``.
    """
    from dmdr_fast.eval.plots import plot_mean_std_curves

    if base.model.family != "digits":
        raise UserError(
            f"experiment coldstart: --preset with model.family={base.model.family!r}: the experiment evaluates "
            "with the digits evaluation network at fixed steps, so it runs the digits-family presets "
            "(digits, digits-grpo); a text-to-image evaluation at fixed steps is not built yet"
        )
    cfg0 = coldstart_config(base, eval_steps, setting)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = load_assets(cfg0, cache_dir, progress=progress)
    results: dict[str, dict[int, list[dict[str, float]]]] = {arm: {k: [] for k in eval_steps} for arm in ARMS}
    for seed in seeds:
        extra = [f"train.seed={seed}"]
        if setting == "reinit":
            extra.append(
                f"student.init={_reinit_student(assets, out / f'reinit-seed{seed}.safetensors', seed)}"
            )
        for arm, (rs, dg) in ARMS.items():
            cfg = cfg0.with_overrides(
                [*extra, f"dmdr.dynars={rs}", f"dmdr.dynadg={dg}", f"name={slug(arm)}-seed{seed}"]
            )
            # One segment per evaluation step, each continuing the previous one's checkpoint: the
            # Trainer evaluates at the end of every fit, so the history holds exactly these steps.
            for k in eval_steps:
                trainer = train_student(
                    cfg.with_overrides([f"train.max_steps={k}"]),
                    assets,
                    out / cfg.name,
                    resume=True,
                    progress=progress,
                )
            by_step = {int(r["step"]): r for r in trainer.state.history}
            for k in eval_steps:
                results[arm][k].append({m: float(v) for m, v in by_step[k].items() if m != "step"})
    text = _tables(results, eval_steps, seeds, setting, cfg0)
    (out / "table.md").write_text(text)
    curves = {
        arm: {m: [(k, [r[m] for r in runs]) for k, runs in steps.items()] for m in ("fd", "recall")}
        for arm, steps in results.items()
    }
    plot_mean_std_curves(
        curves,
        out / "curves.png",
        ["fd", "recall"],
        titles={"fd": "FD ↓ (mean ± std)", "recall": "recall ↑ (mean ± std)"},
    )
    summary = {
        "results": {arm: {str(k): v for k, v in steps.items()} for arm, steps in results.items()},
        "seeds": list(seeds),
        "eval_steps": list(eval_steps),
        "setting": setting,
        "real_vs_real": assets.info["real_vs_real"],
    }
    write_json(out / "experiment.json", summary)
    return summary


def _tables(
    results: dict[str, dict[int, list[dict[str, float]]]],
    eval_steps: tuple[int, ...],
    seeds: tuple[int, ...],
    setting: str,
    cfg: DMDRTrainerConfig,
) -> str:
    """The FD at a glance (arms × steps), then every metric per arm and step."""
    head = [
        f"# Cold-start strategies, DMD only — setting `{setting}`",
        "",
        f"{cfg.student.num_steps}-step student, no reward, stage 1 learning rates throughout; DynaRS / DynaDG "
        f"anneal over the first {cfg.dmdr.dynamic_horizon} generator steps. Seeds {list(seeds)}: mean ± std "
        f"over the seeds (sample std); {cfg.train.num_eval_samples} samples per evaluation.",
        "",
        "## FD ↓ by generator step",
        "",
        "| arm | " + " | ".join(str(k) for k in eval_steps) + " |",
        "|" + "---|" * (len(eval_steps) + 1),
    ]
    for arm, steps in results.items():
        cells = [mean_std([r["fd"] for r in steps[k]], digits=2) for k in eval_steps]
        head.append(f"| {arm} | " + " | ".join(cells) + " |")
    rows = {f"{arm}, step {k}": steps[k] for arm, steps in results.items() for k in eval_steps}
    return (
        "\n".join(head) + "\n\n## Every metric\n\n" + mean_std_table(rows, METRICS, first_column="arm, step")
    )
