"""``dmdr-fast experiment digits``: DMD-only, DMDR and reward-only students on one digits teacher.

Each student trains on the same cached teacher; the table puts them next to the teacher with and
without CFG, with the reward-hacking monitor's verdict for each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdr_fast.config import DMDRTrainerConfig, RewardConfig
from dmdr_fast.recipes.digits.run import (
    balanced_labels,
    default_cache_dir,
    evaluate_images,
    prepare_assets,
    teacher_samples,
    train_student,
    write_json,
)

__all__ = ["run_experiment"]


def run_experiment(
    out_dir: str | os.PathLike[str],
    base: DMDRTrainerConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher (with and without CFG), DMD-only, DMDR (fixed and balanced reward weighting) and
    reward-only students on one teacher, with the reward-hacking monitor's verdict for each."""
    from dmdr_fast.eval.plots import plot_metric_curves, plot_monitor, save_comparison_grid
    from dmdr_fast.eval.report import write_metrics_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = prepare_assets(
        cache_dir if cache_dir is not None else default_cache_dir(),
        base.model.kwargs.get("teacher"),
        base.model.kwargs.get("classifiers"),
        progress=progress,
    )
    n = base.train.num_eval_samples
    labels = balanced_labels(n)
    results: dict[str, dict[str, float]] = {}
    grids: dict[str, torch.Tensor] = {}
    for w in (1.0, float(base.model.kwargs.get("experiment_cfg", 2.0))):
        img = teacher_samples(assets, labels, steps=50, guidance=w)
        results[f"teacher 50-step, CFG {w:g}"] = evaluate_images(assets, img, labels)
        grids[f"teacher CFG {w:g}"] = img[:50]
    reward = base.active_rewards[0] if base.active_rewards else RewardConfig(kind="classifier", weight=0.05)
    total = base.train.max_steps
    balanced_ratio = float(base.model.kwargs.get("experiment_balanced_ratio", 0.5))
    runs = {
        "DMD only": base.with_overrides(["rewards=[]", "dmdr.cold_start_steps=0"]),
        "DMDR fixed": base.with_overrides(["rewards.0.combine=fixed"]),
        "DMDR balanced": base.with_overrides(
            ["rewards.0.combine=balanced", f"rewards.0.ratio={balanced_ratio}"]
        ),
        "reward only": base.with_overrides(
            [
                "dmdr.dmd_weight=0",
                "dmdr.cold_start_steps=0",
                f"rewards=[{{kind: classifier, weight: {reward.weight}}}]",
            ]
        ),
    }
    histories, monitors, verdicts = {}, {}, {}
    for name, cfg in runs.items():
        cfg = cfg.with_overrides([f"name={name.replace(' ', '-').lower()}", f"train.max_steps={total}"])
        trainer = train_student(cfg, assets, out / cfg.name, progress=progress)
        img = trainer.student.decode(trainer.sample(labels, generator=torch.Generator().manual_seed(4321)))
        row = f"{name} (1-step)"
        results[row] = evaluate_images(assets, img, labels)
        grids[name] = img[:50]
        histories[name] = trainer.state.history
        if trainer.monitor is not None:
            monitors[name] = trainer.monitor.history
            verdicts[name] = {"verdict": trainer.monitor.verdict(), "warnings": trainer.monitor.warnings}
    write_metrics_table(results, out / "table.md", title="Digits: teacher vs 1-step students")
    save_comparison_grid(grids, out / "samples.png", nrow=10)
    plot_metric_curves(
        histories, out / "curves.png", metrics=["fd", "recall", "accuracy", "diversity_ratio", "reward"]
    )
    if monitors:
        plot_monitor(monitors, out / "monitor.png")
        lines = ["| run | monitor verdict |", "|---|---|"]
        lines += [f"| {n} | {v['verdict']} |" for n, v in verdicts.items()]
        (out / "monitor.md").write_text("\n".join(lines) + "\n")
    summary = {
        "results": results,
        "histories": histories,
        "monitor": monitors,
        "verdicts": verdicts,
        "real_vs_real": assets.info["real_vs_real"],
    }
    write_json(out / "experiment.json", summary)
    return summary
