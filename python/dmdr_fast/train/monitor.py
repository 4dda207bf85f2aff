"""The reward-hacking monitor: is the reward rising for the wrong reasons?

Reward hacking shows as a training reward that keeps rising while everything the student is *not*
trained on gets worse: a held-out judge (another reward model, or an evaluation network trained on
other data) stops agreeing, and samples lose diversity (the generator collapses onto what the
reward likes best). The monitor measures exactly these, on fixed noise and fixed held-out
conditions so that successive evaluations differ only by the student's weights:

* ``train_reward``: ``−Σ_k ℓ_k`` of the training rewards (the mean score for a single ``neg``
  reward), on the held-out conditions;
* ``heldout``: the mean score of the held-out judge;
* ``diversity``: the mean pairwise distance, in a feature space, between the
  ``samples_per_condition`` samples drawn for each condition (different noise, same condition);
* ``dmd_loss``: the mean DMD loss of the generator steps since the previous evaluation: a student
  drifting away from the teacher's distribution makes it grow (absent when no DMD term is on);
* ``cosine``: the mean cosine between the DMD and reward directions on x0 over the generator steps
  since the previous evaluation (from :func:`dmdr_fast.ops.reward_grad_combine`): a reward that
  pulls against distribution matching shows a negative cosine.

While the reward is being optimised, an evaluation is *suspicious* when the training reward rose
(by more than ``reward_tol``) and the held-out score fell (by more than ``heldout_tol``), the
diversity fell (by more than ``diversity_tol``, relative) or the DMD loss rose (by more than
``dmd_tol``, relative) since the previous evaluation;
``patience`` suspicious evaluations in a row give a warning. The rule is deliberately simple and
its thresholds are in :class:`~dmdr_fast.config.MonitorConfig`.

A collapsed student stops *changing*: its reward is flat at the top and its diversity flat at the
bottom, so the evaluations after the first warning are no longer suspicious by the rule above.
From the first warning on, each evaluation is therefore also compared with the *baseline* — the
evaluation just before the streak that led to the warning — on the signals that streak flagged;
an evaluation still past a tolerance on one of them *looks collapsed* (``collapsed`` in its
record), and the verdict says how many did and whether the last one still does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from dmdr_fast.conditions import index_cond
from dmdr_fast.config import DMDRTrainerConfig, MonitorConfig
from dmdr_fast.data.prompts import PromptBatch
from dmdr_fast.eval.metrics import mean_pairwise_distance, pixel_features

__all__ = [
    "MonitoredRun",
    "RewardHackingMonitor",
    "mean_pairwise_distance",
    "pixel_features",
    "repeat_conditions",
]

#: ``(images, cond) -> (B,)`` held-out scores (a :class:`~dmdr_fast.rewards.Reward` fits).
HeldoutScore = Callable[[Tensor, Any], Tensor]


def repeat_conditions(conditions: Any, k: int) -> Any:
    """Each condition ``k`` times in a row (labels, prompt strings or a :class:`PromptBatch`)."""
    if isinstance(conditions, Tensor):
        return conditions.repeat_interleave(k, dim=0)
    if isinstance(conditions, PromptBatch):  # pre-encoded prompts: repeat the condition rows too
        index = torch.arange(len(conditions)).repeat_interleave(k)
        return PromptBatch(
            prompts=repeat_conditions(conditions.prompts, k),
            condition=index_cond(conditions.condition, index),
        )
    return [c for c in conditions for _ in range(k)]


def _scored_reward(reward: Any, images: Tensor, cond: Any) -> float:
    """``Σ_k weight_k · mean(score_k)`` with every reward called as a black box (failures skipped)."""
    from dmdr_fast.rewards.scoring import score_robustly

    members = reward.members
    report = score_robustly([(m.spec.name, m) for m in members], images, cond)
    total = 0.0
    for j, m in enumerate(members):
        col = report.scores[:, j]
        ok = torch.isfinite(col)
        total += m.spec.weight * (float(col[ok].mean()) if ok.any() else math.nan)
    return total


class MonitoredRun(Protocol):
    """What the monitor needs of a run (the :class:`~dmdr_fast.train.trainer.Trainer` has it)."""

    config: DMDRTrainerConfig
    reward: Any
    student: Any

    def sample(
        self, raw_cond: Any, *, generator: torch.Generator | None = None, use_ema: bool = True
    ) -> Tensor:
        """Few-step samples of the student for raw conditions."""
        ...


class RewardHackingMonitor:
    """Measures and judges the signs of reward hacking during a DMDR run.

    Args:
        conditions: The held-out conditions: ``(G,)`` labels or G prompts (not used in training
            batches if possible).
        heldout: The held-out judge ``(images, cond) -> (B,)``, or None (then only diversity is
            checked).
        features: ``images -> (B, F)`` features for diversity (default :func:`pixel_features`);
            an evaluation network's embedding is better than pixels.
        config: Samples per condition, patience and tolerances; None = the Trainer's
            ``config.monitor`` (set when the monitor is passed to the Trainer).
    """

    def __init__(
        self,
        conditions: Tensor | Sequence[str] | PromptBatch,
        *,
        heldout: HeldoutScore | None = None,
        features: Callable[[Tensor], Tensor] | None = None,
        config: MonitorConfig | None = None,
    ) -> None:
        self.config_given = config is not None
        self.config = config if config is not None else MonitorConfig()
        if len(conditions) == 0:
            raise ValueError("the monitor needs at least one held-out condition")
        self.conditions = conditions
        self.heldout = heldout
        self.features = features if features is not None else pixel_features
        self.history: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self._streak = 0
        self._baseline: dict[str, float] | None = None  # the evaluation before the first warned streak
        self._signals: list[str] = []  # what that streak flagged: heldout / diversity / dmd_loss

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def measure(self, trainer: MonitoredRun) -> dict[str, float]:
        """Sample the student (current weights, fixed noise) and score the samples."""
        cfg = self.config
        k = cfg.samples_per_condition
        raw = repeat_conditions(self.conditions, k)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = trainer.sample(raw, generator=gen, use_ema=False)
        # Decoded in training-batch chunks: a VAE decoding every held-out sample at 1024² at once
        # needs far more memory than the training step itself.
        chunk = trainer.config.train.batch_size
        images = torch.cat(
            [trainer.student.decode(x[i : i + chunk]).float() for i in range(0, x.shape[0], chunk)]
        )
        if isinstance(raw, PromptBatch):
            raw = list(raw.prompts)  # rewards and judges score against the prompt text
        raw_dev = raw.to(images.device) if isinstance(raw, Tensor) else raw
        out: dict[str, float] = {}
        if trainer.reward is not None and trainer.config.rl.enabled:  # scored rewards (train/rl.py)
            out["train_reward"] = _scored_reward(trainer.reward, images, raw_dev)
        elif trainer.reward is not None:
            r = trainer.reward(images, raw_dev)
            terms = list(r.terms.values())
            out["train_reward"] = float(-sum(t.mean() for t in terms)) if terms else math.nan
        if self.heldout is not None:
            out["heldout"] = float(self.heldout(images, raw_dev).float().mean())
        feats = self.features(images).reshape(images.shape[0], -1)
        out["diversity"] = mean_pairwise_distance(feats, len(self.conditions))
        return out

    # ------------------------------------------------------------------ judging

    def _worse(self, prev: dict[str, float], cur: dict[str, float]) -> list[str]:
        """The signals (``heldout``, ``diversity``, ``dmd_loss``) on which ``cur`` is worse than
        ``prev`` by more than their tolerances."""
        c = self.config
        out = []
        if "heldout" in cur and "heldout" in prev and cur["heldout"] < prev["heldout"] - c.heldout_tol:
            out.append("heldout")
        if cur["diversity"] < prev["diversity"] * (1 - c.diversity_tol):
            out.append("diversity")
        if "dmd_loss" in cur and "dmd_loss" in prev and cur["dmd_loss"] > prev["dmd_loss"] * (1 + c.dmd_tol):
            out.append("dmd_loss")
        return out

    def _suspicious(self, prev: dict[str, float], cur: dict[str, float]) -> list[str]:
        """Reasons why ``cur`` looks like hacking relative to ``prev`` (empty: it does not)."""
        rose = cur.get("train_reward", math.nan) - prev.get("train_reward", math.nan)
        if not rose > self.config.reward_tol:  # also False for NaN
            return []
        names = {"heldout": "held-out score", "diversity": "diversity", "dmd_loss": "DMD loss"}
        return [f"{names[k]} {prev[k]:.4g}→{cur[k]:.4g}" for k in self._worse(prev, cur)]

    def update(self, step: int, values: dict[str, float], *, active: bool = True) -> str | None:
        """Record one evaluation; returns a warning when ``patience`` suspicious ones came in a row.

        Args:
            step: The generator step.
            values: :meth:`measure`'s result, optionally with ``cosine``.
            active: Whether the reward was being optimised since the previous evaluation
                (stage 2); inactive evaluations are recorded but reset the streak.
        """
        row = {"step": float(step), **{k: float(v) for k, v in values.items()}}
        prev = self.history[-1] if self.history else None
        reasons = self._suspicious(prev, row) if (prev is not None and active) else []
        self._streak = self._streak + 1 if reasons else 0
        row["suspicious"] = float(bool(reasons))
        row["streak"] = float(self._streak)
        row["flag"] = float(self._streak >= self.config.patience)
        if row["flag"] and self._baseline is None:  # the first warning: remember what was flagged
            streak = [*self.history[len(self.history) - self._streak + 1 :], row]
            self._baseline = self.history[len(self.history) - self._streak]
            pairs = list(zip([self._baseline, *streak[:-1]], streak, strict=True))
            self._signals = [
                k
                for k in ("heldout", "diversity", "dmd_loss")
                if any(k in self._worse(p, r) for p, r in pairs)
            ]
        if self._baseline is not None:  # from the first warning on: not recovered yet?
            still = [k for k in self._worse(self._baseline, row) if k in self._signals]
            row["collapsed"] = float(bool(row["flag"]) or bool(still))
        self.history.append(row)
        if self._streak >= self.config.patience:
            rose = f"training reward {prev['train_reward']:.4g}→{row['train_reward']:.4g}" if prev else ""
            msg = (
                f"possible reward hacking at step {step}: {self._streak} evaluations in a row with the "
                f"training reward rising ({rose}) while " + " and ".join(reasons)
            )
            self.warnings.append(msg)
            return msg
        return None

    @property
    def first_flag_step(self) -> int | None:
        """The first step at which the monitor warned, or None."""
        for row in self.history:
            if row["flag"]:
                return int(row["step"])
        return None

    @property
    def collapsed_after_warning(self) -> tuple[int, int]:
        """``(looking collapsed, evaluations)`` from the first warning on (the warned one included)."""
        after = [r for r in self.history if "collapsed" in r]
        return sum(int(r["collapsed"]) for r in after), len(after)

    def verdict(self) -> str:
        """One line for a report: that the monitor never warned; or when it first did, how many
        evaluations from then on still look collapsed, and whether the last one does ("WARNED from
        step 40, still collapsed: ...") or not ("..., recovered: ...")."""
        first = self.first_flag_step
        total = len(self.history)
        if first is None:
            return f"no warning ({total} evaluations)"
        bad, after = self.collapsed_after_warning
        if self._baseline is None:  # a state from before the collapse tracking
            return f"WARNED from step {first} ({total} evaluations)"
        state = "still collapsed" if self.history[-1].get("collapsed") else "recovered"
        names = {"heldout": "held-out score", "dmd_loss": "DMD loss"}
        signals = ", ".join(names.get(k, k) for k in self._signals)
        return (
            f"WARNED from step {first}, {state}: {bad} of the {after} evaluations from then on look "
            f"collapsed ({signals} worse than at step {int(self._baseline['step'])}); {total} evaluations"
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "warnings": list(self.warnings),
            "streak": self._streak,
            "baseline": dict(self._baseline) if self._baseline is not None else None,
            "signals": list(self._signals),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.history = list(sd["history"])
        self.warnings = list(sd["warnings"])
        self._streak = int(sd["streak"])
        # Checkpoints written before the collapse tracking have neither key.
        self._baseline = dict(sd["baseline"]) if sd.get("baseline") is not None else None
        self._signals = list(sd.get("signals", []))
