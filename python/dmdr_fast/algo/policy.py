"""The few-step student as a stochastic policy with exact transition log-probabilities (GRPO).

Our few-step sampler (docs/method.md §3) is already stochastic: step k predicts
``x̂0 = x_k − t_k·G(x_k, t_k, c)`` and moves to ``x_{k+1} = (1 − t_{k+1})·x̂0 + t_{k+1}·ε_k`` with
fresh noise, so every transition but the last is a Gaussian

    π(x_{k+1} | x_k) = N((1 − t_{k+1})·x̂0(x_k), t_{k+1}² I),        k = 0 .. N−2,

whose noise is exactly the one the student was distilled with — no SDE conversion of the flow is
needed, unlike a teacher sampled by an ODE (Flow-GRPO). The last step is deterministic (t_N = 0),
and a 1-step student has only that one; the policy's output is therefore made a Gaussian around
the student's final prediction with a small fixed standard deviation ``out_std`` (``rl.sde_noise``):

    π(y | x_{N−1}) = N(x̂0(x_{N−1}), out_std² I).

``out_std`` is in the model's space (latents or pixels); the reward scores the mean (the student's
own output) or the sample ``y`` as the caller chooses. Log-probabilities are summed over all
non-batch dimensions and include the normalising constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dmdr_fast.algo.flow import VelocityFn
from dmdr_fast.conditions import index_cond

__all__ = [
    "PolicyRollout",
    "gaussian_logprob",
    "policy_logprobs",
    "policy_means",
    "policy_rollout",
    "transition_logprobs",
    "transition_stds",
]


def gaussian_logprob(x: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """``log N(x; mean, std² I)`` per sample, summed over every dimension but the first.

    Args:
        x, mean: (B, ...) tensors.
        std: a positive float or a (B,) tensor.

    Returns:
        (B,) float32.
    """
    d = (x.float() - mean.float()).flatten(1)
    s = torch.as_tensor(std, dtype=torch.float32, device=d.device).reshape(-1, 1).expand(d.shape[0], 1)
    if not (s > 0).all():
        raise ValueError("gaussian_logprob: std must be > 0")
    n = d.shape[1]
    return -0.5 * (d / s).pow(2).sum(1) - n * s[:, 0].log() - 0.5 * n * math.log(2 * math.pi)


@dataclass
class PolicyRollout:
    """One rollout of the stochastic few-step policy.

    Attributes:
        states: (N, B, ...) the inputs x_0 .. x_{N−1} of the N steps (x_0 = the initial noise).
        output: (B, ...) the policy's output y (the last action).
        mean_output: (B, ...) the student's final prediction x̂0(x_{N−1}) (y's mean).
        logprobs: (N, B) log π of each action (x_1 .. x_{N−1}, then y) at sampling time.
        grid: (N + 1,) the time grid.
    """

    states: Tensor
    output: Tensor
    mean_output: Tensor
    logprobs: Tensor
    grid: Tensor

    def actions(self) -> Tensor:
        """(N, B, ...) the action of each step: x_1 .. x_{N−1}, then y."""
        return torch.cat([self.states[1:], self.output[None]])


def _means(velocity_fn: VelocityFn, x: Tensor, k: int, grid: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
    """(x̂0 at step k, the mean of step k's action)."""
    t = grid[k].expand(x.shape[0]).to(x.device)
    x0 = x - t.view(-1, *[1] * (x.dim() - 1)) * velocity_fn(x, t, cond).to(x.dtype)
    last = k == grid.numel() - 2
    return x0, x0 if last else (1 - grid[k + 1]) * x0


def transition_stds(grid: Tensor, out_std: float) -> list[float]:
    """The N transition standard deviations: t_1 .. t_{N−1}, then ``out_std``."""
    n = grid.numel() - 1
    return [float(grid[k + 1]) for k in range(n - 1)] + [float(out_std)]


@torch.no_grad()
def policy_rollout(
    velocity_fn: VelocityFn,
    noise: Tensor,
    cond: Any,
    grid: Tensor,
    *,
    out_std: float,
    generator: torch.Generator | None = None,
) -> PolicyRollout:
    """Sample the stochastic few-step policy (no grad) and record each action's log-probability.

    Args:
        velocity_fn: the student G(x, t, c).
        noise: (B, ...) the initial noise x_0.
        cond: the batch's condition (one per sample; a group repeats its condition).
        grid: (N + 1,) decreasing times from ≤ 1 to 0.
        out_std: std of the output Gaussian (> 0).
        generator: RNG of the transition noise (CPU generator; noise is drawn on CPU, then moved).
    """
    if grid.dim() != 1 or grid.numel() < 2 or float(grid[-1]) != 0.0:
        raise ValueError("grid must be a (N + 1,) tensor of decreasing times ending at 0")
    if not out_std > 0:
        raise ValueError(f"out_std (rl.sde_noise) must be > 0, got {out_std}")
    n = grid.numel() - 1
    stds = transition_stds(grid, out_std)
    x, states, logps = noise, [], []
    mean_out = noise
    for k in range(n):
        states.append(x)
        x0, mean = _means(velocity_fn, x, k, grid, cond)
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
        nxt = mean + stds[k] * eps
        logps.append(gaussian_logprob(nxt, mean, stds[k]))
        if k == n - 1:
            mean_out = x0
        x = nxt
    return PolicyRollout(torch.stack(states), x, mean_out, torch.stack(logps), grid)


def policy_means(velocity_fn: VelocityFn, rollout: PolicyRollout, cond: Any) -> tuple[Tensor, Tensor]:
    """The student's predictions at every recorded state, with gradients, in ONE batched forward.

    All N steps' states go through ``velocity_fn`` as one (N·B) batch (the condition repeated per
    step): one graph for the backward, which DDP needs (one forward per backward), and one large
    call instead of N small ones.

    Returns:
        ``(x0s, means)``: (N, B, ...) the clean estimates x̂0(x_k) and the action means
        ``(1 − t_{k+1})·x̂0`` (the last step's mean is x̂0 itself).
    """
    n, b = rollout.states.shape[:2]
    x = rollout.states.flatten(0, 1)
    t = rollout.grid[:-1].to(x.device).repeat_interleave(b)
    big_cond = index_cond(cond, torch.arange(b).repeat(n)) if cond is not None else None
    v = velocity_fn(x, t, big_cond).to(x.dtype)
    x0s = (x - t.view(-1, *[1] * (x.dim() - 1)) * v).unflatten(0, (n, b))
    scale = torch.ones(n, dtype=x0s.dtype, device=x0s.device)
    scale[:-1] = (1 - rollout.grid[1:-1]).to(scale)
    return x0s, x0s * scale.view(n, *[1] * (x0s.dim() - 1))


def policy_logprobs(velocity_fn: VelocityFn, rollout: PolicyRollout, cond: Any, *, out_std: float) -> Tensor:
    """(N, B) log π(action_k | state_k) under the current ``velocity_fn``, with its gradient —
    the numerator of GRPO's probability ratio ``exp(log π_θ − log π_old)``."""
    _, means = policy_means(velocity_fn, rollout, cond)
    return transition_logprobs(rollout, means, out_std=out_std)


def transition_logprobs(rollout: PolicyRollout, means: Tensor, *, out_std: float) -> Tensor:
    """(N, B) log-density of each recorded action under the Gaussians with ``means`` (N, B, ...)."""
    actions = rollout.actions()
    stds = transition_stds(rollout.grid, out_std)
    return torch.stack([gaussian_logprob(actions[k], means[k], stds[k]) for k in range(len(stds))])
