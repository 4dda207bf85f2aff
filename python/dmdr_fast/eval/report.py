"""Markdown tables of metrics, e.g. teacher vs DMDR vs DMD-only vs reward-only on the digits preset."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["DEFAULT_DIRECTIONS", "format_metrics_table", "write_metrics_table"]

DEFAULT_DIRECTIONS: dict[str, str] = {
    "fd": "min",
    "precision": "max",
    "recall": "max",
    "accuracy": "max",
    "diversity": "max",
}
"""Which way is better for the metrics of :func:`~dmdr_fast.eval.metrics.evaluate_features`.

``diversity_ratio`` has no direction on purpose: above 1 can mean noise-like samples, not a better
generator, so its best value is not marked.
"""

_ARROWS = {"min": " ↓", "max": " ↑"}


def _fmt(value: object, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–" if math.isnan(value) else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _best(values: list[object], direction: str | None) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    nums = [v for v in nums if math.isfinite(v)]
    if direction not in ("min", "max") or len(nums) < 2:
        return None
    return min(nums) if direction == "min" else max(nums)


def format_metrics_table(
    results: Mapping[str, Mapping[str, object]],
    metrics: Sequence[str] | None = None,
    digits: int = 4,
    directions: Mapping[str, str] | None = None,
    bold_best: bool = True,
) -> str:
    """Formats a dict of dicts as a markdown table: one row per run, one column per metric.

    Args:
        results: Run name -> {metric -> value}. Rows keep the mapping's order.
        metrics: Columns, in order; default every key, in first-seen order.
        digits: Decimal places for floats.
        directions: Metric -> ``"min"`` or ``"max"`` (better); default :data:`DEFAULT_DIRECTIONS`.
            Columns with a direction get an arrow in the header.
        bold_best: Bold the best value of each column that has a direction (ties all bold).

    Returns:
        The table, ending in a newline. Missing and NaN values show as ``–``.
    """
    if directions is None:
        directions = DEFAULT_DIRECTIONS
    if metrics is None:
        seen: dict[str, None] = {}
        for row in results.values():
            for key in row:
                seen.setdefault(key, None)
        metrics = list(seen)
    header = ["run"] + [m + _ARROWS.get(directions.get(m, ""), "") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {m: _best([row.get(m) for row in results.values()], directions.get(m)) for m in metrics}
    for name, row in results.items():
        cells = [str(name)]
        for m in metrics:
            value = row.get(m)
            text = _fmt(value, digits)
            is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
            if bold_best and best[m] is not None and is_num and float(value) == best[m]:  # type: ignore[arg-type]
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_table(
    results: Mapping[str, Mapping[str, object]],
    path: str | os.PathLike[str],
    title: str | None = None,
    metrics: Sequence[str] | None = None,
    digits: int = 4,
    directions: Mapping[str, str] | None = None,
    bold_best: bool = True,
) -> str:
    """Writes :func:`format_metrics_table` to a markdown file.

    Args:
        results: Run name -> {metric -> value}.
        path: Output ``.md`` file; parent directories are created.
        title: Optional ``# title`` line above the table.
        metrics: See :func:`format_metrics_table`.
        digits: See :func:`format_metrics_table`.
        directions: See :func:`format_metrics_table`.
        bold_best: See :func:`format_metrics_table`.

    Returns:
        The text written.
    """
    text = format_metrics_table(results, metrics, digits, directions, bold_best)
    if title:
        text = f"# {title}\n\n{text}"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text
