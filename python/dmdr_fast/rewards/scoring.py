"""Scoring a rollout batch with rewards that may be slow, fail or return NaN (docs/method.md §12).

A non-differentiable scorer (a VLM judge, OCR, a web API, a user's function) is called in chunks
with a progress bar. A chunk that raises is scored again one sample at a time, so that only the
samples that really fail are lost; a failed or non-finite score becomes NaN, which
:func:`dmdr_fast.algo.advantages.group_advantages` drops from its group. Every failure is
reported (the first message of each kind is kept) — a run never crashes on a scorer's bad
sample, and a NaN never reaches an update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dmdr_fast.conditions import index_cond

__all__ = ["ScoreReport", "score_robustly"]

#: ``scorer(images (b, C, H, W) in [0, 1], cond) -> (b,) scores`` — a Reward or any callable.
Scorer = Callable[[Tensor, Any], Any]


@dataclass
class ScoreReport:
    """What :func:`score_robustly` met.

    Attributes:
        scores: (B, R) float32, NaN where a sample's score is missing.
        failed: reward name → number of samples whose call raised.
        nonfinite: reward name → number of samples scored NaN/Inf.
        messages: reward name → the first exception message.
    """

    scores: Tensor
    failed: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per reward with a problem ('' when there was none)."""
        names = sorted(set(self.failed) | set(self.nonfinite))
        return "; ".join(
            f"{n}: {self.failed.get(n, 0)} failed, {self.nonfinite.get(n, 0)} non-finite"
            + (f" (first error: {self.messages[n]})" if n in self.messages else "")
            for n in names
        )


def _as_scores(out: Any, b: int) -> Tensor:
    scores = torch.as_tensor(out.detach() if isinstance(out, Tensor) else out, dtype=torch.float32).cpu()
    if scores.shape != (b,):
        raise ValueError(f"returned shape {tuple(scores.shape)} for {b} samples, expected ({b},)")
    return scores


def score_robustly(
    scorers: Sequence[tuple[str, Scorer]],
    images: Tensor,
    cond: Any,
    *,
    chunk_size: int = 64,
    progress: bool = False,
) -> ScoreReport:
    """Score ``images`` with every scorer, in chunks, under ``torch.no_grad``.

    Args:
        scorers: ``(name, scorer)`` pairs; a scorer returns a (b,) tensor, array or list.
        images: (B, C, H, W) decoded images in ``[0, 1]``.
        cond: the batch's condition (labels, prompts, or a condition tree; sliced per chunk).
        chunk_size: samples per call.
        progress: a tqdm bar over the chunks.

    Returns:
        A :class:`ScoreReport`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B = images.shape[0]
    report = ScoreReport(torch.full((B, len(scorers)), float("nan")))
    starts = list(range(0, B, chunk_size))
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * len(scorers), desc="scoring", leave=False)
    with torch.no_grad():
        for j, (name, scorer) in enumerate(scorers):
            for s in starts:
                idx = list(range(s, min(s + chunk_size, B)))
                _score_chunk(report, j, name, scorer, images, cond, idx)
                if bar is not None:
                    bar.update(1)
            bad = ~torch.isfinite(report.scores[:, j])
            n_bad = int(bad.sum()) - report.failed.get(name, 0)
            if n_bad:
                report.nonfinite[name] = n_bad
            report.scores[bad, j] = float("nan")  # ±Inf too: it would poison a group's statistics
    if bar is not None:
        bar.close()
    return report


def _sub(cond: Any, idx: list[int]) -> Any:
    if isinstance(cond, Sequence) and not isinstance(cond, (str, Tensor)):
        return [cond[i] for i in idx]
    if cond is None:
        return None
    return index_cond(cond, torch.tensor(idx, dtype=torch.long))


def _score_chunk(
    report: ScoreReport, j: int, name: str, scorer: Scorer, images: Tensor, cond: Any, idx: list[int]
) -> None:
    try:
        report.scores[idx, j] = _as_scores(scorer(images[idx], _sub(cond, idx)), len(idx))
        return
    except Exception as exc:  # any scorer error (not KeyboardInterrupt): find the failing samples
        if len(idx) == 1:
            report.failed[name] = report.failed.get(name, 0) + 1
            report.messages.setdefault(name, f"{type(exc).__name__}: {exc}"[:200])
            return
    for i in idx:  # one at a time: only the samples that fail are lost
        _score_chunk(report, j, name, scorer, images, cond, [i])
