"""DMDR math on tensors: time grids and schedules, samplers, backward simulation and losses.

Pure tensor code (docs/architecture.md §2): no optimizers, no I/O, no model classes. Networks are callables
``velocity_fn(x (B, ...), t (B,), cond) -> v (B, ...)`` in the rectified-flow convention
``x_t = (1 − t)·x0 + t·ε``, ``v ≈ ε − x0``, ``x̂0 = x_t − t·v`` (t = 1 is pure noise). Every
schedule is keyed on ``step``, the number of generator updates so far, and every random draw
accepts a ``torch.Generator``.

Modules:
    schedules: few-step grid, cosine progress, DynaRS renoise times, DynaDG real-score scale.
    sampling: few-step sampler, backward simulation, multi-step Euler sampler for the teacher.
    guidance: CFG scale with jitter, the batched fake/cond/uncond guidance query and its split.
    losses: critic flow-matching loss, generator DMD loss, Decoupled DMD.
    policy: the few-step sampler as a stochastic policy with exact transition log-probabilities.
    advantages: group-relative advantages of scored rewards, the CA weights of mode 2.
    grpo: GRPO's clipped policy-gradient loss and the KL baseline (docs/method.md §12).
    flow: the convention's formulas (renoise, x̂0 from a velocity, velocity target, seeded noise) and
        the ``VelocityFn`` type. Condition helpers come from :mod:`dmdr_fast.conditions`.
"""

from dmdr_fast.algo._utils import rand, randn
from dmdr_fast.algo.advantages import AdvantageMode, ca_weights, group_advantages
from dmdr_fast.algo.flow import VelocityFn, noise_like, predict_x0, renoise, velocity_target, x0_from_velocity
from dmdr_fast.algo.grpo import clipped_policy_loss, transition_kl
from dmdr_fast.algo.guidance import (
    GuidanceBatch,
    GuidanceQuery,
    GuidanceScale,
    concat_guidance_queries,
    real_velocity,
    uses_cfg,
)
from dmdr_fast.algo.losses import DecoupledDMDLoss, critic_loss, decoupled_dmd_loss, generator_dmd_loss
from dmdr_fast.algo.policy import (
    PolicyRollout,
    gaussian_logprob,
    policy_logprobs,
    policy_means,
    policy_rollout,
    transition_logprobs,
    transition_stds,
)
from dmdr_fast.algo.sampling import (
    BackwardSimulation,
    FewStepTrajectory,
    backward_simulation,
    euler_sample,
    few_step_sample,
)
from dmdr_fast.algo.schedules import (
    DynaDG,
    DynaRS,
    cosine_progress,
    dynadg_real_scale,
    dynars_beta_params,
    few_step_timesteps,
    sample_beta,
    sample_gamma,
)
from dmdr_fast.conditions import Cond, cat_conds, cond_batch_size, expand_cond, index_cond, map_tensors

__all__ = [
    "AdvantageMode",
    "BackwardSimulation",
    "Cond",
    "DecoupledDMDLoss",
    "DynaDG",
    "DynaRS",
    "FewStepTrajectory",
    "GuidanceBatch",
    "GuidanceQuery",
    "GuidanceScale",
    "PolicyRollout",
    "VelocityFn",
    "backward_simulation",
    "ca_weights",
    "cat_conds",
    "clipped_policy_loss",
    "concat_guidance_queries",
    "cond_batch_size",
    "cosine_progress",
    "critic_loss",
    "decoupled_dmd_loss",
    "dynadg_real_scale",
    "dynars_beta_params",
    "euler_sample",
    "expand_cond",
    "few_step_sample",
    "few_step_timesteps",
    "gaussian_logprob",
    "generator_dmd_loss",
    "group_advantages",
    "index_cond",
    "map_tensors",
    "noise_like",
    "policy_logprobs",
    "policy_means",
    "policy_rollout",
    "predict_x0",
    "rand",
    "randn",
    "real_velocity",
    "renoise",
    "sample_beta",
    "sample_gamma",
    "transition_kl",
    "transition_logprobs",
    "transition_stds",
    "uses_cfg",
    "velocity_target",
    "x0_from_velocity",
]
