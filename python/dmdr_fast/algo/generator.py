"""The generator update of one DMDR iteration, as tensor functions (docs/method.md §5.3–§8).

What the Trainer does in a generator step, in order, each a function here:

1. :func:`dmd_inputs` — renoise ``sg(x0)`` at DynaRS times, draw the batch's CFG scale, and ask
   the score networks for the fake and real velocities there (:func:`score_velocities`: ONE
   batched forward of the guidance network with per-sample LoRA scales, or a full critic plus the
   teacher); with Decoupled DMD also the CFG-augmentation sample (:func:`ca_sample`).
2. :func:`dmd_direction` — the DMD gradient ``g`` on a detached copy of ``x0`` (plain or
   Decoupled DMD, through the fused op).
3. :func:`reward_groups` + :func:`add_reward_gradients` — each reward's gradient on ``x0`` joined
   to ``g`` per its :class:`RewardPolicy` (``fixed``: ``g + λ·g_R``; ``balanced``: norm-matched).

The Trainer then pushes the result through the student with ``x0.backward(g)``. Networks enter as
callables (:data:`GuidanceFn`, :data:`~dmdr_fast.algo.flow.VelocityFn`), so nothing here knows
about LoRA layers, optimisers or devices beyond the tensors it is given; every random draw takes
the run's ``torch.Generator``, in a fixed order (resumed runs replay it exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from dmdr_fast.algo._utils import host_to_device, rand
from dmdr_fast.algo.flow import VelocityFn, noise_like, renoise
from dmdr_fast.algo.guidance import GuidanceQuery, GuidanceScale, concat_guidance_queries
from dmdr_fast.algo.losses import decoupled_dmd_loss, generator_dmd_loss
from dmdr_fast.algo.schedules import DynaRS
from dmdr_fast.conditions import Cond, cat_conds, expand_cond
from dmdr_fast.ops import reward_grad_combine

__all__ = [
    "CAInputs",
    "DMDInputs",
    "GuidanceFn",
    "RewardGroup",
    "RewardPolicy",
    "ScoreNetworks",
    "ScoreQuery",
    "add_reward_gradients",
    "ca_sample",
    "decoupled_inputs",
    "dmd_direction",
    "dmd_inputs",
    "fake_and_real",
    "reward_groups",
    "score_velocities",
]

GuidanceFn = Callable[[Tensor, Tensor, Cond, "Tensor | float | None"], Tensor]
"""``guidance(x, t, cond, lora_scale) -> v``: the guidance network H(·; λ). ``lora_scale`` is a
(B,) per-sample tensor or one float for the batch, or None for the network as it is (the plain
teacher next to a full critic)."""

CARenoise = Literal["independent", "shared", "above_input"]


class ScoreQuery(NamedTuple):
    """Where a score is asked: samples (B, ...), times (B,), condition."""

    x: Tensor
    t: Tensor
    cond: Cond


@dataclass(frozen=True)
class ScoreNetworks:
    """How a generator step reaches the real and fake scores.

    Attributes:
        guidance: H(·; λ) (:data:`GuidanceFn`): the teacher at λ = 0, the DynaDG target at λ_r(s)
            and, with a LoRA critic, the fake score at ``fake_scale``.
        fake_scale: λ_f, the fake score's LoRA scale (LoRA critic).
        critic: a full trainable critic's velocity for the fake score (DMD2's choice); None when
            the critic is the LoRA of ``guidance``.
    """

    guidance: GuidanceFn
    fake_scale: float
    critic: VelocityFn | None = None


class CAInputs(NamedTuple):
    """Decoupled DMD's CFG-augmentation inputs (no grad): renoised ``sg(x0)`` (B, ...) at times
    (B,), and the real score's conditional and unconditional velocities there (B, ...)."""

    x_t: Tensor
    t: Tensor
    v_cond: Tensor
    v_uncond: Tensor


class DMDInputs(NamedTuple):
    """Everything the DMD direction needs besides ``x0`` (all without grad).

    Attributes:
        x_t: (B, ...) ``(1 − τ')·sg(x0) + τ'·ε'`` (Decoupled DMD: the DM term's sample).
        t: (B,) τ'.
        v_fake: (B, ...) fake-score velocity at ``x_t``.
        v_cond: (B, ...) conditional real-score velocity at ``x_t``.
        v_uncond: (B, ...) unconditional real-score velocity, or None without CFG (and always
            None with Decoupled DMD, whose CFG part is in ``ca``).
        guidance: the batch's CFG scale w (1.0 when no unconditional pass was run).
        real_scale: λ_r(s) the real score was asked at.
        ca: Decoupled DMD's CFG-augmentation inputs, or None for plain DMD.
    """

    x_t: Tensor
    t: Tensor
    v_fake: Tensor
    v_cond: Tensor
    v_uncond: Tensor | None
    guidance: float
    real_scale: float
    ca: CAInputs | None = None


# --------------------------------------------------------------------------------------------------
# The score networks.
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_velocities(
    nets: ScoreNetworks, fake: ScoreQuery, reals: Sequence[ScoreQuery], real_scale: float
) -> tuple[Tensor, list[Tensor]]:
    """The fake score at ``fake`` and the real score at each of ``reals``, all (B, ...) float32.

    A LoRA critic answers everything in ONE batched forward with per-sample LoRA scales
    (``[λ_f, λ_r, λ_r, ...]``). A full critic runs the fake query, the teacher runs the real ones
    batched, and DynaDG moves each real velocity toward the critic's conditional velocity at the
    same sample by ``λ_r/λ_f`` (a LoRA critic interpolates in weight space instead).

    Args:
        nets: the score networks.
        fake: the fake-score query.
        reals: the real-score queries (cond, uncond; Decoupled DMD adds a sample).
        real_scale: DynaDG's λ_r(s).
    """
    if nets.critic is None:
        queries = [GuidanceQuery(*fake, nets.fake_scale), *(GuidanceQuery(*r, real_scale) for r in reals)]
        batch = concat_guidance_queries(queries)
        out = nets.guidance(batch.x, batch.t, batch.cond, batch.lora_scale)
        v_fake, *v_real = batch.chunk(out.float())
        return v_fake, v_real
    v_fake = nets.critic(*fake).float()
    xs, ts, conds = zip(*reals, strict=True)
    out = nets.guidance(torch.cat(xs), torch.cat(ts), cat_conds(list(conds)), None).float()
    v_real = list(out.chunk(len(reals)))
    if real_scale > 0:
        mix = real_scale / nets.fake_scale
        critic_at = {(id(fake.x), id(fake.t)): v_fake}
        for i, (x, t, _) in enumerate(reals):
            key = (id(x), id(t))
            if key not in critic_at:  # Decoupled DMD's CA sample: one more critic forward
                critic_at[key] = nets.critic(x, t, fake.cond).float()
            v_real[i] = v_real[i] + mix * (critic_at[key] - v_real[i])
    return v_fake, v_real


def fake_and_real(
    nets: ScoreNetworks, x: Tensor, t: Tensor, cond: Cond, null: Cond | None, real_scale: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(v_fake, v_cond, v_uncond or None)`` at one renoised sample (``null`` None: no CFG pass)."""
    if null is not None:
        null = expand_cond(null, x.shape[0])  # a batch-1 null condition is broadcast
    reals = [ScoreQuery(x, t, cond)] + ([ScoreQuery(x, t, null)] if null is not None else [])
    v_fake, v_real = score_velocities(nets, ScoreQuery(x, t, cond), reals, real_scale)
    return v_fake, v_real[0], v_real[1] if null is not None else None


# --------------------------------------------------------------------------------------------------
# Decoupled DMD's CFG-augmentation sample.
# --------------------------------------------------------------------------------------------------


def ca_sample(
    x0: Tensor,
    x_tau: Tensor,
    tau: Tensor,
    t_in: Tensor,
    *,
    mode: CARenoise,
    renoise_times: DynaRS,
    step: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Decoupled DMD's CFG-augmentation sample ``(x, t)`` (docs/method.md §8).

    ``independent`` renoises ``x0`` again at a fresh draw of the DMD renoise law, ``shared``
    reuses ``(x_tau, tau)`` (one guidance part fewer), ``above_input`` draws τ_ca ~ U(t_k, 1) above
    the student's input time ``t_in`` (B,); samples of the first step (t_k = 1: nothing lies
    above) fall back to the DMD law, since τ_ca = 1 would renoise to pure noise and make the term
    independent of x0. Draws from ``generator`` unless ``shared``.

    Args:
        x0: (B, ...) ``sg(x0)``.
        x_tau: (B, ...) the DM term's renoised sample.
        tau: (B,) its times.
        t_in: (B,) the student's input times t_k.
        mode: ``dmdr.ca_renoise``.
        renoise_times: the DMD renoise law (DynaRS).
        step: generator updates so far (the schedule's s).
        generator: the run's RNG.
    """
    if mode == "shared":
        return x_tau, tau
    B = x0.shape[0]
    ca_t = host_to_device(renoise_times.sample(B, step, generator=generator), x0.device)
    if mode == "above_input":
        u = rand((B,), generator=generator, device=x0.device)
        t_in = t_in.to(ca_t)
        ca_t = torch.where(t_in < 1, t_in + (1.0 - t_in) * u, ca_t)
    return renoise(x0, ca_t, noise_like(x0, generator)), ca_t


def decoupled_inputs(
    nets: ScoreNetworks,
    x0: Tensor,
    x_tau: Tensor,
    tau: Tensor,
    t_in: Tensor,
    cond: Cond,
    null: Cond,
    real_scale: float,
    *,
    mode: CARenoise,
    renoise_times: DynaRS,
    step: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, CAInputs]:
    """Decoupled DMD: ``(v_fake, v_cond)`` at the DM sample ``x_tau`` and the CA inputs.

    One guidance forward holds (fake, cond) at τ and (cond, uncond) at τ_ca — 4B parts, or 3B
    when the CA sample is ``shared`` (see :func:`ca_sample` for the other arguments).
    """
    null = expand_cond(null, x0.shape[0])
    ca_x, ca_t = ca_sample(
        x0, x_tau, tau, t_in, mode=mode, renoise_times=renoise_times, step=step, generator=generator
    )
    reals = [ScoreQuery(x_tau, tau, cond), ScoreQuery(ca_x, ca_t, cond), ScoreQuery(ca_x, ca_t, null)]
    if ca_x is x_tau:
        reals = reals[::2]  # cond and uncond at the shared sample
    v_fake, v = score_velocities(nets, ScoreQuery(x_tau, tau, cond), reals, real_scale)
    ca_cond = v[0] if ca_x is x_tau else v[1]
    return v_fake, v[0], CAInputs(ca_x, ca_t, ca_cond, v[-1])


# --------------------------------------------------------------------------------------------------
# The generator step's DMD inputs and direction.
# --------------------------------------------------------------------------------------------------


def dmd_inputs(
    nets: ScoreNetworks,
    x0: Tensor,
    t_in: Tensor,
    cond: Cond,
    null: Cond | None,
    *,
    step: int,
    renoise_times: DynaRS,
    cfg: GuidanceScale,
    real_scale: float,
    decoupled: bool,
    ca_renoise: CARenoise,
    generator: torch.Generator,
) -> DMDInputs:
    """Renoise ``sg(x0)``, draw the CFG scale and ask the scores: the DMD loss's inputs.

    Draws, in this order: τ' (DynaRS), ε', the CFG jitter, then (Decoupled DMD) the CA sample.

    Args:
        nets: the score networks.
        x0: (B, ...) the generator's output (its gradient is not used here).
        t_in: (B,) the student's input times (Decoupled DMD's ``above_input``).
        cond: the batch's condition.
        null: the unconditional condition when CFG is on (``cfg.enabled``), else None.
        step: generator updates so far.
        renoise_times: the DMD renoise law (DynaRS).
        cfg: the real score's CFG scale.
        real_scale: DynaDG's λ_r(s).
        decoupled: Decoupled DMD (needs CFG; the config checks it).
        ca_renoise: Decoupled DMD's CA sample mode.
        generator: the run's RNG.
    """
    x0 = x0.detach()
    B = x0.shape[0]
    tau = host_to_device(renoise_times.sample(B, step, generator=generator), x0.device)
    x_tau = renoise(x0, tau, noise_like(x0, generator))
    w = cfg.sample(generator)
    if decoupled:
        if null is None:
            raise ValueError("Decoupled DMD needs the unconditional condition (CFG on)")
        v_fake, v_cond, ca = decoupled_inputs(
            nets, x0, x_tau, tau, t_in, cond, null, real_scale,
            mode=ca_renoise, renoise_times=renoise_times, step=step, generator=generator,
        )  # fmt: skip
        return DMDInputs(x_tau, tau, v_fake, v_cond, None, w, real_scale, ca)
    v_fake, v_cond, v_uncond = fake_and_real(nets, x_tau, tau, cond, null, real_scale)
    return DMDInputs(x_tau, tau, v_fake, v_cond, v_uncond, w if v_uncond is not None else 1.0, real_scale)


def dmd_direction(
    x0: Tensor,
    inputs: DMDInputs,
    *,
    dmd_weight: float,
    ca_weight: float,
    eps: float,
    backend: str | None = None,
    ca_sample_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The DMD part of the generator's gradient on ``x0`` (docs/method.md §5.4 and §8).

    Args:
        x0: (B, ...) a detached copy of the generator's output that requires grad (a leaf).
        inputs: :func:`dmd_inputs`'s result.
        dmd_weight: weight of L_DMD (Decoupled DMD: of its DM term); 0 = no DMD term.
        ca_weight: weight of Decoupled DMD's CA term.
        eps: added to the per-sample normalisers.
        backend: the fused op's backend (None: automatic).
        ca_sample_weight: Decoupled DMD only: (B,) weights of the CA term per sample (advantage
            weighting, docs/method.md §12; :func:`dmdr_fast.algo.advantages.ca_weights`).

    Returns:
        ``(g, metrics)``: g (B, ...) the gradient of ``dmd_weight·L_DMD`` (Decoupled:
        ``dmd_weight·L_DM + ca_weight·L_CA``) w.r.t. ``x0``, and ``loss_dmd`` (plus ``loss_dm``,
        ``loss_ca``) for the log.
    """
    if inputs.ca is not None:
        ca = inputs.ca
        out = decoupled_dmd_loss(
            x0, dm_x_t=inputs.x_t, dm_t=inputs.t, v_fake=inputs.v_fake, dm_v_cond=inputs.v_cond,
            ca_x_t=ca.x_t, ca_t=ca.t, ca_v_cond=ca.v_cond, ca_v_uncond=ca.v_uncond,
            guidance=inputs.guidance, dm_weight=dmd_weight, ca_weight=ca_weight, eps=eps, backend=backend,
            ca_sample_weight=ca_sample_weight,
        )  # fmt: skip
        (g,) = torch.autograd.grad(out.loss, x0)
        return g, {"loss_dmd": out.loss.item(), "loss_dm": out.dm_loss.item(), "loss_ca": out.ca_loss.item()}
    if ca_sample_weight is not None:
        raise ValueError(
            "ca_sample_weight needs Decoupled DMD (dmdr.decoupled: true): plain DMD has no CA term"
        )
    if dmd_weight > 0:
        loss = generator_dmd_loss(
            x0, inputs.x_t, inputs.t, inputs.v_fake, inputs.v_cond, inputs.v_uncond, inputs.guidance,
            eps=eps, backend=backend,
        )  # fmt: skip
        assert isinstance(loss, Tensor)
        (g,) = torch.autograd.grad(dmd_weight * loss, x0)
        return g, {"loss_dmd": loss.item()}
    return torch.zeros_like(x0), {}


# --------------------------------------------------------------------------------------------------
# Rewards.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardPolicy:
    """How one reward's gradient joins the DMD gradient (docs/method.md §7; from ``config.rewards``).

    Attributes:
        name: the reward's name (its key in the reward output's ``terms``).
        combine: ``"fixed"``: ``g + weight·g_R``; ``"balanced"``: per sample ``g + w_i·g_R`` with
            ``w_i = min(max_weight, ratio·|g_DMD,i| / |g_R,i|)``.
        weight: λ_R of ``fixed``.
        ratio: the target norm ratio of ``balanced``.
        max_weight: the cap of ``balanced`` (None: no cap).
    """

    name: str
    combine: Literal["fixed", "balanced"] = "fixed"
    weight: float = 1.0
    ratio: float = 1.0
    max_weight: float | None = None


class RewardGroup(NamedTuple):
    """One gradient to take: a name for the log, a scalar loss, the combine op's arguments."""

    name: str
    loss: Tensor
    combine: dict[str, Any]


def reward_groups(terms: Mapping[str, Tensor], policies: Sequence[RewardPolicy]) -> list[RewardGroup]:
    """The reward gradients to take, fewest first-class backward passes possible.

    A single ``fixed`` reward keeps its weight in the op (so the logged norms are the reward's
    own); several ``fixed`` rewards are linear and share one gradient of ``Σ weight·ℓ``; every
    ``balanced`` reward needs its own gradient (its weight depends on that gradient's norm).

    Args:
        terms: per reward name, its (B,) unweighted loss ℓ (the reward output's ``terms``).
        policies: the differentiable rewards' policies, in the rewards' order.
    """
    fixed = [p for p in policies if p.combine == "fixed" and p.weight != 0]
    groups: list[RewardGroup] = []
    if len(fixed) == 1:
        p = fixed[0]
        groups.append(RewardGroup(p.name, terms[p.name].mean(), {"mode": "fixed", "weight": p.weight}))
    elif fixed:
        total = sum(p.weight * terms[p.name].mean() for p in fixed)
        assert isinstance(total, Tensor)
        groups.append(RewardGroup("fixed", total, {"mode": "fixed", "weight": 1.0}))
    for p in policies:
        if p.combine == "balanced" and p.ratio > 0:
            cap = math.inf if p.max_weight is None else p.max_weight
            combine = {"mode": "balanced", "ratio": p.ratio, "max_weight": cap}
            groups.append(RewardGroup(p.name, terms[p.name].mean(), combine))
    return groups


def add_reward_gradients(
    g_dmd: Tensor, x0: Tensor, groups: Sequence[RewardGroup], *, with_dmd: bool, backend: str | None = None
) -> tuple[Tensor, dict[str, float]]:
    """``g = g_DMD + Σ_k w_k·g_k``: each group's gradient on ``x0`` joined by the fused op.

    Each ``w_k`` is balanced against ``g_DMD`` alone (not against the sum so far); a non-finite
    reward gradient is zeroed by the op instead of poisoning the weights.

    Args:
        g_dmd: (B, ...) the DMD direction (:func:`dmd_direction`).
        x0: the leaf the groups' losses were computed from (through decode and the reward).
        groups: :func:`reward_groups`'s result.
        with_dmd: whether a DMD term is on (the cosine and push relative to it are undefined
            without one).
        backend: the fused op's backend.

    Returns:
        ``(g, metrics)`` with per group ``reward_w/<name>`` (mean weight applied),
        ``reward_nonfinite/<name>`` and, with DMD, ``reward_cos/<name>`` (cosine of the DMD and
        reward directions) and ``reward_push/<name>`` (mean ``w·|g_R| / |g_DMD|``).
    """
    g, metrics = g_dmd, {}
    for i, group in enumerate(groups):
        (g_r,) = torch.autograd.grad(group.loss, x0, retain_graph=i + 1 < len(groups))
        combined, st = reward_grad_combine(g_dmd, g_r, backend=backend, **group.combine)
        g = combined if g is g_dmd else g + (combined - g_dmd)
        metrics[f"reward_w/{group.name}"] = st.weight.mean().item()
        if with_dmd:
            push = st.weight * st.reward_norm / st.dmd_norm.clamp_min(1e-30)
            metrics[f"reward_cos/{group.name}"] = st.cosine.mean().item()
            metrics[f"reward_push/{group.name}"] = push.mean().item()
        metrics[f"reward_nonfinite/{group.name}"] = float(st.nonfinite.sum().item())
    return g, metrics
