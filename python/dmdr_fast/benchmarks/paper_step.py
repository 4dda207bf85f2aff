"""The paper's DMDR iteration in eager PyTorch: the baseline of ``dmdr-fast bench step``.

Written the way the authors' released scripts organise the work (docs/method.md §11); see
:mod:`dmdr_fast.benchmarks.bench_step` for what is timed. Shared with the group-relative baselines
of :mod:`dmdr_fast.benchmarks.bench_step_rl`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dmdr_fast.algo import backward_simulation, critic_loss, noise_like, randn, renoise, uses_cfg
from dmdr_fast.algo.generator import ca_sample
from dmdr_fast.models.lora import lora_scale
from dmdr_fast.train.trainer import Trainer

__all__ = ["paper_dmd_loss", "paper_generator_loss", "paper_iteration"]


def paper_dmd_loss(x0, x_t, t, v_fake, v_cond, v_uncond, w, sample_weight=None):
    """The DMD loss as the paper's scripts write it (docs/method.md §5.4 and §11); ``sample_weight``
    (B,): each sample's term weighted (the advantage-weighted CA term, written eagerly)."""
    tt = t.view(-1, *[1] * (x0.dim() - 1))
    v_real = v_uncond + w * (v_cond - v_uncond) if v_uncond is not None else v_cond
    x0_real = x_t - tt * v_real
    x0_fake = x_t - tt * v_fake
    p_real = x0 - x0_real
    normalizer = torch.abs(p_real).mean(dim=list(range(1, x0.dim())), keepdim=True)
    grad = (x0_fake - x0_real) / (normalizer + 1e-8)
    grad = torch.nan_to_num(grad)
    if sample_weight is None:
        return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float(), reduction="mean")
    sq = F.mse_loss(x0.float(), (x0 - grad).detach().float(), reduction="none").flatten(1).mean(1)
    return 0.5 * (sample_weight.to(sq) * sq).mean()


def paper_generator_loss(
    tr: Trainer,
    x0,
    t_in,
    cond,
    s: int,
    *,
    guidance: bool = True,
    decoupled: bool | None = None,
    ca_sample_weight=None,
):
    """The DMD loss on ``x0`` (with grad) the paper's way: a renoised ``sg(x0)``, then **separate**
    guidance forwards (fake, cond, uncond; Decoupled: cond and uncond at the CA sample too) and
    the loss in eager PyTorch. ``guidance=False``: the real score without CFG (GRPO's ``dm``
    regulariser); ``decoupled`` None: ``dmdr.decoupled``; ``t_in`` (B,): x0's input times."""
    cfg = tr.config
    B = x0.shape[0]
    tau2 = tr.dynars.sample(B, s, generator=tr.gen).to(tr.device)
    x_tau = renoise(x0.detach(), tau2, noise_like(x0, tr.gen))
    w = tr.cfg_scale.sample(tr.gen) if guidance else 1.0
    cfg_on = guidance and tr.cfg_scale.enabled
    lam_r = tr.dynadg.real_scale(s)
    # Decoupled DMD written the same way: its CFG-augmentation term at its own renoised sample.
    decoupled = cfg.dmdr.decoupled if decoupled is None else decoupled
    # The CA sample is drawn as the Trainer draws it (what is timed here is the forwards and the loss).
    ca_x, ca_t = (x_tau, tau2)
    if decoupled:
        ca_x, ca_t = ca_sample(
            x0.detach(), x_tau, tau2, t_in,
            mode=cfg.dmdr.ca_renoise, renoise_times=tr.dynars, step=s, generator=tr.gen,
        )  # fmt: skip
    with torch.no_grad(), tr.autocast():
        with lora_scale(tr.guidance.network, cfg.critic.fake_scale):
            v_fake = tr.guidance.velocity(x_tau, tau2, cond)
        with lora_scale(tr.guidance.network, lam_r):
            v_cond = tr.guidance.velocity(x_tau, tau2, cond)
            ca_cond = tr.guidance.velocity(ca_x, ca_t, cond) if ca_x is not x_tau else v_cond
            v_uncond = tr.guidance.velocity(ca_x, ca_t, tr.student.null_condition(B)) if cfg_on else None
    v_uncond = v_uncond.float() if v_uncond is not None else None
    if decoupled:  # DM: v_cond vs v_fake; CA: the CFG'd real score vs v_cond in the fake slot
        loss = cfg.dmdr.dmd_weight * paper_dmd_loss(
            x0, x_tau, tau2, v_fake.float(), v_cond.float(), None, 1.0
        )
        if uses_cfg(w):  # a jittered scale at or below 1 has no CFG term (as decoupled_dmd_loss)
            ca = paper_dmd_loss(
                x0, ca_x, ca_t, ca_cond.float(), ca_cond.float(), v_uncond, w, ca_sample_weight
            )
            loss = loss + cfg.dmdr.ca_weight * ca
        return loss
    return cfg.dmdr.dmd_weight * paper_dmd_loss(x0, x_tau, tau2, v_fake.float(), v_cond.float(), v_uncond, w)


def paper_iteration(tr: Trainer, *, batch: tuple[Any, Any] | None = None, ca_weight_fn=None) -> None:
    """One iteration the paper's way on ``tr``'s networks, optimisers and RNG (LoRA critic).

    ``batch``: ``(raw, cond)`` already sampled (the group-relative modes: K samples per condition);
    ``ca_weight_fn(x0, raw) -> (B,)``: per-sample weights of the Decoupled CA term (mode 2's
    baseline scores the batch there)."""
    cfg, st = tr.config, tr.state
    s, B = st.gen_step, cfg.train.batch_size
    raw, cond = batch if batch is not None else tr.encode(tr.data.sample(B, tr.gen))
    with torch.no_grad(), tr.autocast():
        sim = backward_simulation(
            tr.student.velocity,
            randn((B, *tr.student.sample_shape), generator=tr.gen, device=tr.device),
            cond,
            tr.grid,
            mode=cfg.student.backward_sim,  # the T2I scripts roll out to the final sample ("final")
            generator=tr.gen,
            prune=False,
        )
    x0_sel = sim.x0_sel
    assert x0_sel is not None  # kept: the simulation ran without skip_selected
    tau = tr.dynars.sample(B, s, generator=tr.gen).to(tr.device)
    eps = noise_like(x0_sel, tr.gen)
    tr.opt_c.zero_grad(set_to_none=True)
    with lora_scale(tr.guidance.network, cfg.critic.fake_scale):  # backward inside: checkpointing recomputes
        with tr.autocast():
            v = tr.guidance.velocity(renoise(x0_sel, tau, eps), tau, cond)
        critic_loss(v.float(), x0_sel.float(), eps).backward()
    torch.nn.utils.clip_grad_norm_([p for p in tr.guidance.network.parameters() if p.requires_grad], 1.0)
    tr.opt_c.step()
    st.step += 1
    if st.step % cfg.dmdr.ratio_update != 0:
        return
    tr.opt_g.zero_grad(set_to_none=True)
    with tr.autocast():
        v_g = tr.student.velocity(sim.x_in, sim.t_in, cond)
    x0 = sim.x_in - sim.t_in.view(-1, *[1] * (sim.x_in.dim() - 1)) * v_g.float()
    ca_w = ca_weight_fn(x0.detach(), raw) if ca_weight_fn is not None else None
    loss = paper_generator_loss(tr, x0, sim.t_in, cond, s, ca_sample_weight=ca_w)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in tr.student.network.parameters() if p.requires_grad], 1.0)
    tr.opt_g.step()
    st.gen_step += 1
