"""The Trainer's group-relative modes: rewards scored as black boxes (docs/method.md §12).

From stage 2 on, with ``rl.algorithm`` set, every batch holds ``B / K`` conditions each sampled
``K = rl.group_size`` times, every active reward is *called*, never differentiated
(:func:`~dmdr_fast.rewards.scoring.score_robustly`: in chunks; a sample whose scorer raises or
returns NaN is dropped from its group and reported, never fatal), and the scores become group
advantages (:func:`~dmdr_fast.algo.advantages.group_advantages`). Then:

- ``advantage_weighted`` (mode 2): the ordinary generator step of Decoupled DMD with the CA term
  weighted per sample by ``max(0, 1 + β·A)`` (:meth:`GroupRL.weighted_direction`), the DM term
  unweighted — no log-probabilities, any number of student steps;
- ``grpo`` (mode 1): the generator-update iteration becomes :meth:`GroupRL.grpo_iteration` — a
  rollout of the stochastic few-step policy (:func:`~dmdr_fast.algo.policy.policy_rollout`), the
  critic update on the rollout's samples (so the fake score keeps tracking the student and DMD
  stays valid), scoring, then ``rl.passes`` optimiser steps on the clipped policy-gradient loss
  plus the regulariser (``dmd``: the run's DMD loss at one transition per sample; ``dm``: its
  real score without CFG; ``kl``: Flow-GRPO's KL to the student at the start of stage 2;
  ``none``). The passes count as one generator step.

The math is in :mod:`dmdr_fast.algo` (policy, advantages, grpo); this module keeps the order and the
little state the modes need (the KL reference weights, checkpointed).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dmdr_fast.algo import (
    GuidanceScale,
    ca_weights,
    clipped_policy_loss,
    group_advantages,
    policy_means,
    policy_rollout,
    transition_kl,
    transition_logprobs,
    transition_stds,
)
from dmdr_fast.algo._utils import randint
from dmdr_fast.algo.generator import dmd_direction, dmd_inputs
from dmdr_fast.conditions import Cond, slice_cond
from dmdr_fast.data.prompts import PromptBatch
from dmdr_fast.rewards.scoring import score_robustly
from dmdr_fast.train.monitor import repeat_conditions
from dmdr_fast.train.runtime import grad_norm, swapped_weights, trainable

#: The :class:`~dmdr_fast.train.trainer.Trainer` these steps run for (not imported: it imports this
#: module; the steps use its networks, optimisers, RNG and helpers).
Trainer = Any

__all__ = ["GroupRL"]

_NO_CFG = GuidanceScale(1.0)


class GroupRL:
    """The state and steps of ``rl.algorithm`` for one :class:`~dmdr_fast.train.trainer.Trainer`.

    Args:
        trainer: the Trainer (its ``reward`` is the :class:`~dmdr_fast.rewards.CompositeReward`
            whose members are scored; weights: each member's ``spec.weight``).
    """

    def __init__(self, trainer: Trainer) -> None:
        if trainer.reward is None:
            raise ValueError(f"rl.algorithm={trainer.config.rl.algorithm!r} needs a reward")
        self.config = trainer.config.rl
        k, b, world = self.config.group_size, trainer.config.train.batch_size, trainer.world
        if (b * world) % k:
            raise ValueError(
                f"rl.group_size ({k}) must divide the world batch train.batch_size × world size "
                f"({b} × {world} = {b * world}): every batch holds whole groups"
            )
        members = trainer.reward.members
        self.scorers = [(m.spec.name, m) for m in members]
        self.weights = [float(m.spec.weight) for m in members]
        self.groups: torch.Tensor | None = None  # (B,) group index of the current batch
        # grpo + kl: the student's trainable weights when stage 2 began (Flow-GRPO's reference).
        self.reference: dict[str, torch.Tensor] | None = None

    @property
    def grpo(self) -> bool:
        return self.config.algorithm == "grpo"

    # ------------------------------------------------------------------ groups and scores

    def sample(self, trainer: Trainer, batch_size: int) -> tuple[Any, Cond]:
        """This process's part of the world batch of groups, encoded; sets :attr:`groups`.

        The world batch (``batch_size × world`` samples) holds ``batch_size·world / K``
        conditions, each K times in a row, drawn with a generator seeded by the run's seed and
        the iteration — the same on every rank, so a group may span ranks; rank r takes samples
        ``[r·B, (r + 1)·B)``. :attr:`groups` holds world-wide group indices.
        """
        k, world, rank = self.config.group_size, trainer.world, trainer.rank
        total = batch_size * world
        seed = (trainer.config.train.seed * 1_000_003 + trainer.state.step) % (2**63)
        gen = torch.Generator().manual_seed(seed)  # shared by the ranks; a function of the step
        raw = repeat_conditions(trainer.data.sample(total // k, gen), k)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        self.groups = torch.arange(total // k).repeat_interleave(k)[lo:hi]
        return trainer.encode(_rows(raw, lo, hi))

    @torch.no_grad()
    def score(self, trainer: Trainer, x: torch.Tensor, raw: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Decode ``x`` (B, ...), score it with every reward, and form the group advantages.

        Returns:
            ``(advantages, valid, metrics)``: (B,) on ``x``'s device, and per reward
            ``reward/<name>`` (mean of the valid scores), ``score_dropped/<name>``, plus
            ``adv_abs`` (mean |A|) and ``valid_frac``.
        """
        assert self.groups is not None, "GroupRL.sample sets the groups of the batch"
        cfg = self.config
        chunk = trainer.config.train.batch_size
        images = torch.cat(
            [trainer.student.decode(x[i : i + chunk]).float() for i in range(0, x.shape[0], chunk)]
        )
        calls = -(-x.shape[0] // cfg.score_chunk) * len(self.scorers)
        report = score_robustly(
            self.scorers, images, raw, chunk_size=cfg.score_chunk, progress=calls > 1 and trainer.rank == 0
        )
        if report.failed or report.nonfinite:
            trainer.logger.note(
                f"step {trainer.state.gen_step}: scorer problems ({report.summary()}); samples dropped"
            )
        scores, groups = report.scores, self.groups
        if trainer.world > 1:  # a group may span ranks: its statistics need every member's score
            scores, groups = _all_gather(scores, trainer.device), _all_gather(groups, trainer.device)
        adv, valid = group_advantages(
            scores, groups, weights=self.weights, mode=cfg.advantage, clip=cfg.advantage_clip
        )
        if trainer.world > 1:
            B = x.shape[0]
            adv, valid = (
                adv[trainer.rank * B : (trainer.rank + 1) * B],
                valid[trainer.rank * B : (trainer.rank + 1) * B],
            )
        metrics: dict[str, float] = {
            "adv_abs": float(adv.abs().mean()),
            "valid_frac": float(valid.float().mean()),
        }
        for j, (name, _) in enumerate(self.scorers):
            col = report.scores[:, j]
            ok = torch.isfinite(col)
            metrics[f"reward/{name}"] = float(col[ok].mean()) if ok.any() else float("nan")
            metrics[f"score_dropped/{name}"] = float((~ok).sum())
        return adv.to(x.device), valid.to(x.device), metrics

    # ------------------------------------------------------------------ mode 2

    def weighted_direction(
        self, trainer: Trainer, xd: torch.Tensor, inputs: Any, raw: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantage-weighted Decoupled DMD: the DMD direction on ``xd`` with per-sample CA weights."""
        d = trainer.config.dmdr
        adv, valid, metrics = self.score(trainer, xd.detach(), raw)
        w = ca_weights(adv, valid, scale=self.config.ca_scale)
        g, dmd_metrics = dmd_direction(
            xd, inputs, dmd_weight=d.dmd_weight, ca_weight=d.ca_weight, eps=d.eps,
            backend=trainer.config.train.kernel_backend, ca_sample_weight=w,
        )  # fmt: skip
        metrics.update(dmd_metrics, ca_w_max=float(w.max()), ca_w_zero=float((w == 0).float().mean()))
        return g, metrics

    # ------------------------------------------------------------------ mode 1

    def grpo_iteration(self, trainer: Trainer, raw: Any, cond: Cond, stage: int) -> dict[str, float]:
        """One generator-update iteration of GRPO (rollout, critic, scores, ``rl.passes`` steps)."""
        cfg, st = self.config, trainer.state
        s = st.gen_step
        t0 = time.perf_counter()
        B = trainer.config.train.batch_size
        student = trainer.student
        if cfg.regularizer == "kl" and self.reference is None:  # the student as stage 2 begins
            self.reference = {
                n: p.detach().clone() for n, p in student.network.named_parameters() if p.requires_grad
            }
        with trainer.autocast():
            rollout = policy_rollout(
                student.velocity, trainer.draw_noise((B, *student.sample_shape)), cond, trainer.grid,
                out_std=cfg.sde_noise, generator=trainer.gen,
            )  # fmt: skip
        gn_c = trainer.critic_update(rollout.mean_output.float(), cond, s)
        st.step += 1
        adv, valid, metrics = self.score(trainer, rollout.output, raw)
        stds = transition_stds(rollout.grid, cfg.sde_noise)
        dims = rollout.output[0].numel()
        ref_means = None
        if cfg.regularizer == "kl":
            with torch.no_grad(), swapped_weights(student.network, self.reference), trainer.autocast():
                ref_means = policy_means(student.velocity, rollout, cond)[1].float()
        passes: list[dict[str, float]] = []
        inputs = None
        for _ in range(cfg.passes):
            trainer.opt_g.zero_grad(set_to_none=True)
            with trainer.autocast():
                x0s, means = policy_means(trainer.student_forward, rollout, cond)
            x0s, means = x0s.float(), means.float()
            logp = transition_logprobs(rollout, means, out_std=cfg.sde_noise)
            pg, m = clipped_policy_loss(logp, rollout.logprobs, adv, valid, clip=cfg.clip, dims=dims)
            loss = cfg.policy_weight * pg
            m["loss_pg"] = float(pg.detach())
            if ref_means is not None:
                kl = transition_kl(means, ref_means, stds).mean()
                loss = loss + cfg.regularizer_weight * kl
                m["kl"] = float(kl.detach())
            if cfg.regularizer in ("dmd", "dm"):
                x0, inputs, g, dm = self._dmd_regulariser(trainer, x0s, rollout.grid, cond, s)
                m.update(dm)
                torch.autograd.backward([loss, x0], [torch.ones_like(loss), g])
            else:
                loss.backward()
            m["grad_norm_g"] = float(grad_norm(trainable(student.network), trainer.config.optim.grad_clip))
            trainer.opt_g.step()
            passes.append(m)
        for key in passes[0]:  # the first pass is on-policy; the last shows how far the passes moved
            metrics[key] = passes[0][key]
            if len(passes) > 1 and key in ("ratio", "clip_frac", "approx_kl"):
                metrics[f"{key}_last"] = passes[-1][key]
        trainer.update_ema()
        st.gen_step += 1
        return trainer.finish_generator_step(metrics, stage, gn_c, inputs, s, t0)

    def _dmd_regulariser(
        self, trainer: Trainer, x0s: torch.Tensor, grid: torch.Tensor, cond: Cond, s: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor, dict[str, float]]:
        """The DMD (or DM-only) gradient at one transition per sample, drawn uniformly as in the
        backward simulation: ``(x0 with grad, the DMD inputs, g on x0, metrics)``."""
        d, cfg = trainer.config.dmdr, self.config
        n, b = x0s.shape[:2]
        k = randint(n, (b,), generator=trainer.gen, device=x0s.device)
        x0 = x0s[k, torch.arange(b, device=x0s.device)]
        full = cfg.regularizer == "dmd"
        guidance = trainer.cfg_scale if full else _NO_CFG
        null = trainer.student.null_condition(b) if guidance.enabled else None
        inputs = dmd_inputs(
            trainer.scores, x0, grid.to(x0.device)[k], cond, null, step=s, renoise_times=trainer.dynars,
            cfg=guidance, real_scale=trainer.dynadg.real_scale(s), decoupled=full and d.decoupled,
            ca_renoise=d.ca_renoise, generator=trainer.gen,
        )  # fmt: skip
        w = cfg.regularizer_weight
        xd = x0.detach().requires_grad_(True)
        g, metrics = dmd_direction(
            xd, inputs, dmd_weight=w * d.dmd_weight, ca_weight=w * d.ca_weight, eps=d.eps,
            backend=trainer.config.train.kernel_backend,
        )  # fmt: skip
        return x0, inputs, g.to(x0.dtype), metrics

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        ref = (sd or {}).get("reference")
        self.reference = None if ref is None else {k: v.clone() for k, v in ref.items()}


def _rows(raw: Any, lo: int, hi: int) -> Any:
    """Samples ``[lo, hi)`` of raw conditions (labels, prompt strings or a PromptBatch)."""
    if isinstance(raw, PromptBatch):
        return PromptBatch(prompts=list(raw.prompts[lo:hi]), condition=slice_cond(raw.condition, lo, hi))
    return raw[lo:hi]


def _all_gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenation over the ranks, in rank order (the ranks hold equal-sized parts)."""
    import torch.distributed as dist

    # NCCL gathers device tensors only; gloo any. The result comes back on the CPU like ``t``.
    src = t.to(device) if dist.get_backend() == "nccl" else t
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src.contiguous())
    return torch.cat(parts).to(t.device)
