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

__all__ = ["PolicyRollout", "gaussian_logprob", "policy_logprobs", "policy_rollout"]


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


def _stds(grid: Tensor, out_std: float) -> list[float]:
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
    stds = _stds(grid, out_std)
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


def policy_logprobs(velocity_fn: VelocityFn, rollout: PolicyRollout, cond: Any, *, out_std: float) -> Tensor:
    """(N, B) log π(action_k | state_k) under the current ``velocity_fn``, with its gradient —
    the numerator of GRPO's probability ratio ``exp(log π_θ − log π_old)``."""
    actions = rollout.actions()
    stds = _stds(rollout.grid, out_std)
    out = []
    for k in range(rollout.grid.numel() - 1):
        _, mean = _means(velocity_fn, rollout.states[k], k, rollout.grid, cond)
        out.append(gaussian_logprob(actions[k], mean, stds[k]))
    return torch.stack(out)
