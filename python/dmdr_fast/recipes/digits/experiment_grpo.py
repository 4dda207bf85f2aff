"""``dmdr-fast experiment digits-grpo``: which regulariser keeps a GRPO student honest?

One teacher, one reward without gradients (the digits-grpo preset's ink coverage), and per seed one
shared stage 1 (DMD only, ``dmdr.cold_start_steps`` steps): every row continues from that same
checkpoint, so the rows differ only in stage 2:

- **DMD only** — stage 2 without reward (the reference: what DMD alone does in those steps);
- **GRPO + DMD** — the clipped policy gradient with the DMD loss as the regulariser (ours);
- **GRPO + KL** — Flow-GRPO's regulariser: KL of each transition to the student at stage 2's start;
- **GRPO, no regulariser** — the reward-hacking baseline;
- **advantage-weighted DDMD** — Decoupled DMD (CFG ``experiment_cfg``) with the group advantages
  weighting its CA term (mode 2), next to **Decoupled DMD** at the same CFG without reward, so that
  the reward's effect is not confused with the CFG's.

The table gives mean ± std over the seeds of the reward (ink), FD / precision / recall, diversity
and accuracy, and the reward-hacking monitor's verdict of every run; curves and samples go next
to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdr_fast.config import DMDRTrainerConfig
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
from dmdr_fast.train import checkpoint as ckpt

__all__ = ["grpo_rows", "run_grpo_experiment"]


def grpo_rows(base: DMDRTrainerConfig) -> dict[str, list[str]]:
    """Row name → overrides of the digits-grpo preset for stage 2 (``model.kwargs``:
    ``experiment_cfg`` — CFG of the decoupled rows — and ``experiment_kl_weights``)."""
    cfg = f"{float(base.model.kwargs.get('experiment_cfg', 2.0)):g}"
    rows: dict[str, list[str]] = {
        "DMD only": ["rewards=[]", "rl.algorithm=none"],
        "GRPO + DMD": ["rl.regularizer=dmd"],
    }
    for beta in base.model.kwargs.get("experiment_kl_weights", [1.0]):
        rows[f"GRPO + KL (β {float(beta):g})"] = ["rl.regularizer=kl", f"rl.regularizer_weight={float(beta)}"]
    rows["GRPO, no regulariser"] = ["rl.regularizer=none"]
    decoupled = ["dmdr.decoupled=true", f"dmdr.guidance={cfg}"]
    rows[f"Decoupled DMD (CFG {cfg})"] = ["rewards=[]", "rl.algorithm=none", *decoupled]
    rows[f"advantage-weighted DDMD (CFG {cfg})"] = ["rl.algorithm=advantage_weighted", *decoupled]
    return rows


METRICS = ("ink", "fd", "precision", "recall", "diversity_ratio", "accuracy")


def run_grpo_experiment(
    out_dir: str | os.PathLike[str],
    base: DMDRTrainerConfig,
    *,
    seeds: tuple[int, ...] = (30, 31),
    rows: dict[str, list[str]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every row of :func:`grpo_rows` (or ``rows``) for every seed and tabulate them.

    Args:
        out_dir: where each run, ``table.md``, ``curves.png``, ``samples.png`` and
            ``experiment.json`` go.
        base: the digits-grpo preset (with any overrides); its ``dmdr.cold_start_steps`` is the
            shared stage 1 (see :func:`grpo_rows` for the rows' ``model.kwargs``).
        seeds: one shared stage 1 and one run per row for each.
        rows: row name → overrides (default :func:`grpo_rows`).
    """
    from dmdr_fast.eval.plots import plot_metric_curves, save_comparison_grid

    if base.dmdr.cold_start_steps < 1:
        raise ValueError("the experiment branches from a shared stage 1: set dmdr.cold_start_steps >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = load_assets(base, cache_dir, progress=progress)
    table_rows = rows if rows is not None else grpo_rows(base)
    n = base.train.num_eval_samples
    labels = balanced_labels(n)
    results: dict[str, list[dict[str, float]]] = {
        "teacher 50-step": [evaluate_images(assets, t := teacher_samples(assets, labels), labels)]
    }
    grids: dict[str, torch.Tensor] = {"teacher": t[:50]}
    histories: dict[str, list[dict[str, float]]] = {}
    verdicts: dict[str, list[str]] = {}
    for seed in seeds:
        stage1 = base.with_overrides(
            [f"name=stage1-seed{seed}", f"train.seed={seed}", f"train.max_steps={base.dmdr.cold_start_steps}",
             "rewards=[]", "rl.algorithm=none"]
        )  # fmt: skip
        s1_dir = out / stage1.name
        if ckpt.latest_checkpoint(s1_dir) is None or _steps(s1_dir) < stage1.train.max_steps:
            train_student(stage1, assets, s1_dir, resume=True, progress=progress)
        start = ckpt.latest_checkpoint(s1_dir)
        assert start is not None  # train_student saves at the end
        for name, overrides in table_rows.items():
            cfg = base.with_overrides([*overrides, f"name={slug(name)}-seed{seed}", f"train.seed={seed}"])
            trainer = train_student(
                cfg, assets, out / cfg.name, resume=True, start_from=start, progress=progress
            )
            img = final_images(trainer, labels)
            results.setdefault(name, []).append(evaluate_images(assets, img, labels))
            if seed == seeds[0]:
                grids[name] = img[:50]
                histories[name] = trainer.state.history
            if trainer.monitor is not None:
                verdicts.setdefault(name, []).append(trainer.monitor.verdict())
    (out / "table.md").write_text(
        f"Digits, ink-coverage reward, seeds {list(seeds)}; mean ± std over seeds, {n} samples per run.\n\n"
        + mean_std_table(
            results, METRICS, extra={"monitor": {r: monitor_cell(v) for r, v in verdicts.items()}}
        )
    )
    save_comparison_grid(grids, out / "samples.png", nrow=10)
    plot_metric_curves(
        histories, out / "curves.png", metrics=["ink", "fd", "precision", "recall", "diversity_ratio"]
    )
    summary = {"results": results, "verdicts": verdicts, "histories": histories, "seeds": list(seeds)}
    write_json(out / "experiment.json", summary)
    return summary


def _steps(run_dir: Path) -> int:
    path = ckpt.latest_checkpoint(run_dir)
    return 0 if path is None else int(path.stem.split("_")[-1])
