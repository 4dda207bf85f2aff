"""``bench step`` baselines of the group-relative modes (``rl.algorithm``, docs/method.md §12).

* ``grpo``: :func:`flow_grpo_iteration`, a generator-update iteration of GRPO written the way
  Flow-GRPO's training script organises it: the rollout batches the K samples of every group into
  one forward per sampler step; the whole batch is scored in one call per reward and the group
  statistics are taken eagerly; then, in each of ``rl.passes`` passes, **every sampler step
  separately** gets a forward with gradients, its log-probability (a mean over the elements, as
  Flow-GRPO's), the clipped loss and a backward, the gradients accumulating over the N steps
  before the one optimiser step. The KL regulariser (``rl.regularizer=kl``) needs a reference
  forward per step and pass (the reference weights swapped in; Flow-GRPO disables its LoRA
  instead); ``dmd`` / ``dm`` add the DMD loss the paper's way (:func:`paper_generator_loss`:
  separate guidance forwards) at each step for the samples whose transition was drawn there.
  The critic update on the rollout's final predictions is done as ours does it.
* ``advantage_weighted``: :func:`paper_iteration` in its Decoupled form, the batch sampled in
  groups and scored in one call per reward, the advantages turned into CA weights
  ``max(0, 1 + β·A)`` and applied in the eager loss (so both sides compute the same objective).

Both sides use the Trainer's networks, optimisers, reward, RNG and config; the critic-only
iterations of a cycle (R − 1 of them) are the paper's on the baseline side. The baselines assume
finite scores (Flow-GRPO drops nothing; ours drops a NaN sample from its group).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dmdr_fast.algo import critic_loss, noise_like, renoise, transition_stds
from dmdr_fast.algo._utils import randint
from dmdr_fast.benchmarks.paper_step import paper_generator_loss, paper_iteration
from dmdr_fast.conditions import index_cond
from dmdr_fast.models.lora import lora_scale
from dmdr_fast.train.runtime import swapped_weights
from dmdr_fast.train.trainer import Trainer

__all__ = ["advantage_weighted_iteration", "baseline_iteration", "flow_grpo_iteration"]


def baseline_name(cfg) -> str:
    return {"grpo": "flow-grpo", "advantage_weighted": "paper+scores"}.get(cfg.rl.algorithm, "paper")


def rl_summary(cfg) -> str | None:
    rl = cfg.rl
    if not rl.enabled:
        return None
    if rl.algorithm == "grpo":
        return (
            f"GRPO: K={rl.group_size}, passes {rl.passes}, regularizer {rl.regularizer}, "
            f"σ_out {rl.sde_noise}, clip {rl.clip}"
        )
    return f"advantage-weighted Decoupled DMD: K={rl.group_size}, β={rl.ca_scale}"


def baseline_iteration(cfg):
    """The baseline row's iteration for ``cfg``: the paper's, or one of the RL modes'."""
    return {"grpo": flow_grpo_iteration, "advantage_weighted": advantage_weighted_iteration}.get(
        cfg.rl.algorithm, paper_iteration
    )


def _stage2(tr: Trainer) -> bool:
    """True in stage 2, with its learning rates set (as the Trainer's step sets them)."""
    if tr.stage != 2:
        return False
    tr.apply_stage_learning_rates()
    return True


@torch.no_grad()
def eager_advantages(tr: Trainer, x: torch.Tensor, raw: Any) -> torch.Tensor:
    """(B,) group advantages of ``x``: decoded, each reward called ONCE on the whole batch, the
    per-group statistics eagerly (population std, Flow-GRPO's per-prompt tracker); groups are the
    K consecutive samples of one condition."""
    rl = tr.config.rl
    assert tr.reward is not None  # the Trainer refuses an RL config without one
    images = tr.student.decode(x).float()
    cols = [m(images, raw).float().to(x.device) for m in tr.reward.members]
    weights = [float(m.spec.weight) for m in tr.reward.members]
    k = rl.group_size

    def norm(r: torch.Tensor) -> torch.Tensor:
        g = r.view(-1, k)
        std = g.std(1, unbiased=False, keepdim=True)
        a = (g - g.mean(1, keepdim=True)) / (std + 1e-6)
        return torch.where(std > 0, a, torch.zeros_like(a)).flatten()

    if rl.advantage == "sum":
        adv = norm(torch.stack([w * c for w, c in zip(weights, cols)]).sum(0))
    else:  # per_reward (GDPO)
        adv = torch.stack([w * norm(c) for w, c in zip(weights, cols)]).sum(0)
    return adv.clamp(-rl.advantage_clip, rl.advantage_clip)


def advantage_weighted_iteration(tr: Trainer) -> None:
    """Mode 2's baseline: the paper's (Decoupled) iteration with the batch scored in one call and
    the CA term weighted per sample in the eager loss."""
    if not _stage2(tr):
        return paper_iteration(tr)
    assert tr.rl is not None  # rl.algorithm is set
    raw, cond = tr.rl.sample(tr, tr.config.train.batch_size)
    beta = tr.config.rl.ca_scale

    def ca_weights(x0: torch.Tensor, raw: Any) -> torch.Tensor:
        return (1 + beta * eager_advantages(tr, x0, raw)).clamp(min=0)

    paper_iteration(tr, batch=(raw, cond), ca_weight_fn=ca_weights)


def _logprob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Flow-GRPO's log-density: per element, averaged over all but the batch dimension."""
    lp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def _step_mean(tr: Trainer, x: torch.Tensor, k: int, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, the action mean) of sampler step k at states ``x`` (grad as the caller's mode)."""
    grid, n = tr.grid, tr.grid.numel() - 1
    t = grid[k].expand(x.shape[0]).to(x.device)
    with tr.autocast():
        v = tr.student.velocity(x, t, cond)
    x0 = x - t.view(-1, *[1] * (x.dim() - 1)) * v.to(x.dtype)
    return x0, x0 if k == n - 1 else (1 - grid[k + 1]) * x0


def flow_grpo_iteration(tr: Trainer) -> None:
    """One iteration on the baseline side of ``rl.algorithm=grpo`` (the generator-update one the
    Flow-GRPO way, the critic-only ones the paper's)."""
    cfg, st = tr.config, tr.state
    if not _stage2(tr) or (st.step + 1) % cfg.dmdr.ratio_update != 0:
        return paper_iteration(tr)
    rl, s, B = cfg.rl, st.gen_step, cfg.train.batch_size
    student, grid = tr.student, tr.grid
    n = grid.numel() - 1
    group_rl = tr.rl
    assert group_rl is not None  # rl.algorithm is set
    raw, cond = group_rl.sample(tr, B)  # B / K conditions, each K times in a row
    if rl.regularizer == "kl" and group_rl.reference is None:  # the student as stage 2 begins (as ours)
        group_rl.reference = {
            name: p.detach().clone() for name, p in student.network.named_parameters() if p.requires_grad
        }
    stds = transition_stds(grid, rl.sde_noise)  # the policy's own σ_k (algo.policy)

    # 1. Rollout: all groups' K samples in one forward per sampler step; log-probs kept.
    x = tr.draw_noise((B, *student.sample_shape))
    states, actions, logp_old = [], [], []
    with torch.no_grad():
        for k in range(n):
            x0, mean = _step_mean(tr, x, k, cond)
            eps = torch.randn(x.shape, generator=tr.gen, dtype=torch.float32).to(x.device, x.dtype)
            nxt = mean + stds[k] * eps
            states.append(x)
            actions.append(nxt)
            logp_old.append(_logprob(nxt, mean, stds[k]))
            x = nxt
    final = x0.float()  # the student's last prediction (the output's mean)

    # 2. Critic update on the rollout's final predictions (as ours: the fake score tracks them).
    tau = tr.dynars.sample(B, s, generator=tr.gen).to(tr.device)
    eps = noise_like(final, tr.gen)
    tr.opt_c.zero_grad(set_to_none=True)
    with lora_scale(tr.guidance.network, cfg.critic.fake_scale):
        with tr.autocast():
            v = tr.guidance.velocity(renoise(final, tau, eps), tau, cond)
        critic_loss(v.float(), final, eps).backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in tr.guidance.network.parameters() if p.requires_grad], cfg.optim.grad_clip
    )
    tr.opt_c.step()
    st.step += 1

    # 3. Scores of the sampled outputs, one call per reward; group advantages.
    adv = eager_advantages(tr, x, raw)

    # 4. The passes: per sampler step a forward with grad, log-prob, clipped loss, backward.
    params = [p for p in student.network.parameters() if p.requires_grad]
    for _ in range(rl.passes):
        tr.opt_g.zero_grad(set_to_none=True)
        reg_k = (
            randint(n, (B,), generator=tr.gen, device=tr.device) if rl.regularizer in ("dmd", "dm") else None
        )
        for k in range(n):
            t = grid[k].expand(B).to(tr.device)
            if rl.regularizer == "kl":  # first: swapping weights in place would break the graph below
                with torch.no_grad(), swapped_weights(student.network, group_rl.reference):
                    _, ref_mean = _step_mean(tr, states[k], k, cond)
            x0, mean = _step_mean(tr, states[k], k, cond)
            ratio = torch.exp(_logprob(actions[k], mean, stds[k]) - logp_old[k])
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - rl.clip, 1 + rl.clip)).mean()
            loss = rl.policy_weight * pg / n  # gradient accumulation over the N steps
            if rl.regularizer == "kl":
                kl = (mean.float() - ref_mean.float()).pow(2).flatten(1).mean(1) / (2 * stds[k] ** 2)
                loss = loss + rl.regularizer_weight * kl.mean() / n
            if reg_k is not None and bool((sel := (reg_k == k)).any()):
                idx = sel.nonzero()[:, 0]
                dmd = paper_generator_loss(
                    tr, x0[idx].float(), t[idx], index_cond(cond, idx), s,
                    guidance=rl.regularizer == "dmd", decoupled=None if rl.regularizer == "dmd" else False,
                )  # fmt: skip
                loss = loss + rl.regularizer_weight * dmd * (idx.numel() / B)  # its mean over B samples
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        tr.opt_g.step()
    tr.update_ema()
    st.gen_step += 1
