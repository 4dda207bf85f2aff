"""What the digits experiments share: the assets of a base config, run names, seeds, and tables of
mean ± std over seeds (``dmdr-fast experiment digits | digits-grpo | coldstart``)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch

from dmdr_fast._errors import UserError
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.recipes.digits.run import DigitsAssets, default_cache_dir, prepare_assets
from dmdr_fast.train.trainer import Trainer

__all__ = ["final_images", "load_assets", "mean_std", "mean_std_table", "monitor_cell", "parse_seeds", "slug"]


def load_assets(
    base: DMDRTrainerConfig, cache_dir: str | os.PathLike[str] | None, *, progress: bool = True
) -> DigitsAssets:
    """The teacher and classifiers of ``base`` (trained once, then read from the cache)."""
    return prepare_assets(
        cache_dir if cache_dir is not None else default_cache_dir(),
        base.model.kwargs.get("teacher"),
        base.model.kwargs.get("classifiers"),
        progress=progress,
    )


def slug(name: str) -> str:
    """A row name as a folder name: ``"DMDR fixed"`` → ``"dmdr-fixed"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_seeds(text: str, what: str = "--seeds") -> tuple[int, ...]:
    """``"30,31"`` → ``(30, 31)``: distinct integers, at least one.

    Raises:
        UserError: Anything else, naming ``what``.
    """
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(
            f"{what}: expected comma-separated integers, e.g. {what} 30,31; got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{what}: a seed is repeated in {text!r}")
    return seeds


@torch.no_grad()
def final_images(trainer: Trainer, labels: torch.Tensor) -> torch.Tensor:
    """The student's samples for ``labels`` on the experiments' fixed noise, decoded to [0, 1]."""
    return trainer.student.decode(trainer.sample(labels, generator=torch.Generator().manual_seed(4321)))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` with the sample standard deviation (n − 1); the mean alone for one value."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def monitor_cell(verdicts: Sequence[str]) -> str:
    """The reward-hacking monitor's verdicts of one row's runs in a few words."""
    warned = sum(v.startswith("WARNED") for v in verdicts)
    if not warned:
        return f"no warning ({len(verdicts)} runs)"
    still = sum("still collapsed" in v for v in verdicts)
    return f"warned {warned}/{len(verdicts)}, still collapsed at the end {still}/{len(verdicts)}"


def mean_std_table(
    results: Mapping[str, Sequence[Mapping[str, float]]],
    metrics: Sequence[str],
    *,
    first_column: str = "run",
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A markdown table: one row per name, mean ± std over its results (one per seed) per metric.

    Args:
        results: Row name → one metrics dict per run (seed). A metric a run lacks is skipped; a
            row with none shows ``–``.
        metrics: Columns, in order.
        first_column: Header of the name column.
        extra: Column name → row name → text (e.g. the monitor's verdicts); ``—`` where missing.

    Returns:
        The table, ending in a newline; the header says how many runs each row averages.
    """
    extra = extra or {}
    lines = [
        f"| {first_column} | runs | " + " | ".join([*metrics, *extra]) + " |",
        "|" + "---|" * (len(metrics) + len(extra) + 2),
    ]
    for name, rows in results.items():
        cells = []
        for m in metrics:
            vals = [float(r[m]) for r in rows if m in r and math.isfinite(float(r[m]))]
            cells.append(mean_std(vals) if vals else "–")
        cells += [col.get(name, "—") for col in extra.values()]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
