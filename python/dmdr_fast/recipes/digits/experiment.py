"""``dmdr-fast experiment digits``: DMD-only, DMDR and reward-only students on one digits teacher.

Each student trains on the same cached teacher, once per seed; the table puts mean ± std over the
seeds next to the teacher with and without CFG, with the reward-hacking monitor's verdicts.

The rows differ only where their names say: **DMD only** is the DMDR run without its reward
(``rewards=[]``: the same stages, learning rates and steps, so stage 2 runs at stage 2's learning
rates with DMD alone); **DMDR fixed / balanced** add the reward in stage 2 with the two
combination policies; **reward only** drops the DMD term and trains the reward from the start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdr_fast.config import DMDRTrainerConfig, RewardConfig
from dmdr_fast.recipes.digits.experiment_common import (
    final_images,
    load_assets,
    mean_std_table,
    monitor_cell,
    slug,
)
from dmdr_fast.recipes.digits.run import (
    balanced_labels,
    evaluate_images,
    teacher_samples,
    train_student,
    write_json,
)

__all__ = ["METRICS", "experiment_rows", "run_experiment"]

METRICS = ("fd", "precision", "recall", "accuracy", "diversity_ratio", "reward")


def experiment_rows(base: DMDRTrainerConfig) -> dict[str, list[str]]:
    """Row name → overrides of ``base`` (the digits preset: stage 1 DMD, stage 2 DMD + reward)."""
    reward = base.active_rewards[0] if base.active_rewards else RewardConfig(kind="classifier", weight=0.05)
    ratio = float(base.model.kwargs.get("experiment_balanced_ratio", 0.5))
    return {
        "DMD only": ["rewards=[]"],  # the matched run: same stages and learning rates, no reward
        "DMDR fixed": ["rewards.0.combine=fixed"],
        "DMDR balanced": ["rewards.0.combine=balanced", f"rewards.0.ratio={ratio}"],
        "reward only": [
            "dmdr.dmd_weight=0",
            "dmdr.cold_start_steps=0",  # stage 1 would train nothing without the DMD term
            f"rewards=[{{kind: classifier, weight: {reward.weight}}}]",
        ],
    }


def run_experiment(
    out_dir: str | os.PathLike[str],
    base: DMDRTrainerConfig,
    *,
    seeds: tuple[int, ...] = (30, 31),
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher (with and without CFG), then every row of :func:`experiment_rows` for every seed.

    Args:
        out_dir: where each run (``<row>-seed<N>/``), ``table.md``, ``monitor.md``, ``curves.png``,
            ``samples.png`` and ``experiment.json`` go. A run already there is continued (resumed),
            so an interrupted experiment restarts where it stopped.
        base: the digits preset (with any overrides).
        seeds: ``train.seed`` of each row's runs.

    Returns:
        ``results`` (row → one metrics dict per seed), ``verdicts`` (row → the monitor's verdict
        per seed), the first seed's ``histories`` and ``monitor`` records, and ``real_vs_real``.
    """
    from dmdr_fast.eval.plots import plot_metric_curves, plot_monitor, save_comparison_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = load_assets(base, cache_dir, progress=progress)
    n = base.train.num_eval_samples
    labels = balanced_labels(n)
    results: dict[str, list[dict[str, float]]] = {}
    grids: dict[str, torch.Tensor] = {}
    for w in (1.0, float(base.model.kwargs.get("experiment_cfg", 2.0))):
        img = teacher_samples(assets, labels, steps=50, guidance=w)  # no seed: one row each
        results[f"teacher 50-step, CFG {w:g}"] = [evaluate_images(assets, img, labels)]
        grids[f"teacher CFG {w:g}"] = img[:50]
    histories: dict[str, Any] = {}
    monitors: dict[str, Any] = {}
    verdicts: dict[str, list[str]] = {}
    for seed in seeds:
        for name, overrides in experiment_rows(base).items():
            cfg = base.with_overrides([*overrides, f"name={slug(name)}-seed{seed}", f"train.seed={seed}"])
            trainer = train_student(cfg, assets, out / cfg.name, resume=True, progress=progress)
            img = final_images(trainer, labels)
            row = f"{name} ({cfg.student.num_steps}-step)"
            results.setdefault(row, []).append(evaluate_images(assets, img, labels))
            if seed == seeds[0]:
                grids[name] = img[:50]
                histories[name] = trainer.state.history
                if trainer.monitor is not None:
                    monitors[name] = trainer.monitor.history
            if trainer.monitor is not None:
                verdicts.setdefault(row, []).append(trainer.monitor.verdict())
    table = mean_std_table(
        results, METRICS, extra={"hacking monitor": {r: monitor_cell(v) for r, v in verdicts.items()}}
    )
    (out / "table.md").write_text(
        f"# Digits: teacher vs students\n\nSeeds {list(seeds)}: mean ± std over the seeds (sample std); "
        f"{n} samples per run; real-vs-real FD {assets.info['real_vs_real_fd']:.2f}.\n\n{table}"
    )
    save_comparison_grid(grids, out / "samples.png", nrow=10)
    plot_metric_curves(
        histories, out / "curves.png", metrics=["fd", "recall", "accuracy", "diversity_ratio", "reward"]
    )
    if monitors:
        plot_monitor(monitors, out / "monitor.png")
    if verdicts:
        lines = ["| run | seed | monitor verdict |", "|---|---|---|"]
        lines += [
            f"| {r} | {s} | {v} |" for r, vs in verdicts.items() for s, v in zip(seeds, vs, strict=True)
        ]
        (out / "monitor.md").write_text("\n".join(lines) + "\n")
    summary = {
        "results": results,
        "seeds": list(seeds),
        "histories": histories,
        "monitor": monitors,
        "verdicts": verdicts,
        "real_vs_real": assets.info["real_vs_real"],
    }
    write_json(out / "experiment.json", summary)
    return summary
