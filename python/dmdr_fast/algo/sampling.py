"""Samplers: the few-step student sampler, DMDR's backward simulation and a teacher Euler sampler.

All three take the network as a callable ``velocity_fn(x, t, cond) -> v`` (see
:data:`dmdr_fast.algo.flow.VelocityFn`) and a time grid ``t_0 > t_1 > ... > t_N = 0``
(:func:`dmdr_fast.algo.schedules.few_step_timesteps`). Fresh noise comes from the optional
``generator`` (drawn on its device, then moved), so a seeded generator makes every result
reproducible. Times are passed to the network as (B,) tensors in the grid's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dmdr_fast.algo._utils import check_finite, check_int, check_tensor, randint
from dmdr_fast.algo.flow import VelocityFn, noise_like, predict_x0, renoise
from dmdr_fast.algo.guidance import real_velocity, uses_cfg
from dmdr_fast.algo.schedules import few_step_timesteps
from dmdr_fast.conditions import Cond, cat_conds, cond_batch_size, expand_cond, index_cond

__all__ = [
    "BackwardSimulation",
    "FewStepTrajectory",
    "backward_simulation",
    "euler_sample",
    "few_step_sample",
]

BackwardSimMode = Literal["trajectory", "final"]
_BACKWARD_SIM_MODES = ("trajectory", "final")


def _check_grid(timesteps: object, device: torch.device) -> torch.Tensor:
    """Validate a time grid (1-D, >= 2 entries, strictly decreasing, in [0, 1], ends at 0)."""
    if not isinstance(timesteps, torch.Tensor) or not timesteps.is_floating_point():
        raise TypeError("timesteps must be a floating-point torch.Tensor of shape (N + 1,)")
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must have shape (N + 1,) with N >= 1, got {tuple(timesteps.shape)}")
    host = timesteps.detach().cpu()  # checked on one host copy: one device sync, not three
    if not bool((host[1:] < host[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing")
    if float(host[0]) > 1.0 or float(host[-1]) != 0.0:
        first, last = float(host[0]), float(host[-1])
        raise ValueError(f"timesteps must start at <= 1 and end at 0, got {first} ... {last}")
    return timesteps.detach().to(device)


def _times(grid: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """(B,) copy of ``t_k`` for the network (a real tensor, not a stride-0 view it might write to)."""
    return grid[k].repeat(batch)


def _check_cond(cond: Cond, batch: int, name: str = "cond") -> None:
    size = cond_batch_size(cond)
    if size not in (None, batch):
        raise ValueError(f"{name} has batch size {size}, but noise has {batch} samples")


# --------------------------------------------------------------------------------------------------
# Few-step sampler.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewStepTrajectory:
    """Every state of a few-step rollout.

    Attributes:
        inputs: (N, B, ...) the generator's input at each step (``inputs[0]`` is the initial noise).
        x0: (N, B, ...) the clean estimate x̂0 at each step (``x0[-1]`` is the sample).
        timesteps: (N + 1,) the grid used.
    """

    inputs: torch.Tensor
    x0: torch.Tensor
    timesteps: torch.Tensor


def few_step_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Cond,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | FewStepTrajectory:
    """Few-step sampling of the student (docs/method.md §3).

    ``x ← ε``; for k = 0..N−1: ``x̂0 = x − t_k·G(x, t_k, c)``, then
    ``x ← (1 − t_{k+1})·x̂0 + t_{k+1}·ε_k`` with fresh noise ε_k. The result is the last x̂0. No
    noise is drawn for the last step since ``t_N = 0``. Runs in the caller's grad mode.

    Args:
        velocity_fn: the generator G.
        noise: (B, ...) initial noise ε; also fixes shape, dtype and device.
        cond: condition of the batch.
        timesteps: (N + 1,) grid from 1 (or below) down to 0.
        generator: RNG for the fresh noise ε_1..ε_{N−1}.
        return_trajectory: return a :class:`FewStepTrajectory` instead of the sample.

    Returns:
        (B, ...) sample x̂0 in ``noise``'s dtype, or the whole trajectory.
    """
    check_tensor("noise", noise)
    grid = _check_grid(timesteps, noise.device)
    n, batch = grid.numel() - 1, noise.shape[0]
    x = noise
    inputs, estimates = [], []
    x0 = noise
    for k in range(n):
        x0 = predict_x0(velocity_fn, x, _times(grid, k, batch), cond)
        if return_trajectory:
            inputs.append(x)
            estimates.append(x0)
        if k + 1 < n:
            x = renoise(x0, grid[k + 1].expand(batch), noise_like(x0, generator))
    if return_trajectory:
        return FewStepTrajectory(torch.stack(inputs), torch.stack(estimates), grid)
    return x0


# --------------------------------------------------------------------------------------------------
# Backward simulation.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackwardSimulation:
    """Result of the backward simulation: where to train the generator this iteration.

    Attributes:
        x_in: (B, ...) generator input at the selected step (no grad).
        t_in: (B,) the selected step's time ``t_k`` (grid dtype).
        k: (B,) int64 selected step index in [0, N).
        x0_sel: (B, ...) the rollout's clean estimate kept for the critic (no grad); None when
            the simulation ran with ``skip_selected``.
    """

    x_in: torch.Tensor
    t_in: torch.Tensor
    k: torch.Tensor
    x0_sel: torch.Tensor | None


def backward_simulation(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Cond,
    timesteps: torch.Tensor,
    *,
    mode: BackwardSimMode = "trajectory",
    generator: torch.Generator | None = None,
    prune: bool = True,
    skip_selected: bool = False,
) -> BackwardSimulation:
    """Backward simulation (docs/method.md §5.1), without gradients.

    Per sample a step k is drawn uniformly from {0, ..., N−1}, then:

    * ``mode="trajectory"`` (default; DMD2 and the paper's SiT scripts): roll G out from
      ``noise`` as in :func:`few_step_sample`; ``x_in`` is the rollout's own state at step k
      (exactly ``noise`` when k = 0) and ``x0_sel`` the rollout's x̂0 at that step. The rollout
      stops after the largest selected step.
    * ``mode="final"`` (the paper's text-to-image scripts): roll out all N steps to the final
      sample ``x̂0_N``, then re-noise it with fresh noise: ``x_in = (1 − t_k)·x̂0_N + t_k·ε``
      (pure fresh noise when t_k = 1); ``x0_sel = x̂0_N`` for every sample.

    Random draws, in order: k, the rollout's noises, and (``final``) the re-noising noise. The
    rollout's noises are always drawn for the full batch, so ``prune`` does not change results.

    Args:
        velocity_fn: the generator G.
        noise: (B, ...) initial noise.
        cond: condition of the batch.
        timesteps: (N + 1,) student grid.
        mode: ``"trajectory"`` or ``"final"``.
        generator: RNG for k and all noise.
        prune: (trajectory mode) at step j evaluate G only on samples with k >= j, slicing
            ``cond`` with :func:`index_cond`; saves about (N − 1)/(2N) of the rollout's network
            calls but gives the network varying batch sizes (set False for static shapes, e.g.
            under ``torch.compile`` or CUDA graphs).
        skip_selected: (trajectory mode) do not evaluate G at each sample's own step k and return
            ``x0_sel=None``. The generator update evaluates ``x_in − t_k·G(x_in)`` with gradients
            anyway, and with unchanged weights that *is* x̂0_sel: the trainer reuses it and saves
            one network evaluation per sample (for a 1-step student, the whole rollout). Implies
            pruning.

    Returns:
        :class:`BackwardSimulation` with detached tensors.
    """
    check_tensor("noise", noise)
    grid = _check_grid(timesteps, noise.device)
    if mode not in _BACKWARD_SIM_MODES:
        raise ValueError(f"mode must be one of {_BACKWARD_SIM_MODES}, got {mode!r}")
    n, batch = grid.numel() - 1, noise.shape[0]
    _check_cond(cond, batch)
    k = randint(n, (batch,), generator=generator, device=noise.device)
    with torch.no_grad():
        if mode == "final":
            x0_final = few_step_sample(velocity_fn, noise, cond, grid, generator=generator)
            assert isinstance(x0_final, torch.Tensor)
            x_in = renoise(x0_final, grid[k], noise_like(x0_final, generator))
            return BackwardSimulation(x_in=x_in, t_in=grid[k], k=k, x0_sel=x0_final)
        x_in, x0_sel = _rollout_until_selected(
            velocity_fn, noise, cond, grid, k, generator, prune, skip_selected
        )
    return BackwardSimulation(x_in=x_in, t_in=grid[k], k=k, x0_sel=x0_sel)


def _rollout_until_selected(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Cond,
    grid: torch.Tensor,
    k: torch.Tensor,
    generator: torch.Generator | None,
    prune: bool,
    skip_selected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trajectory-mode rollout: record each sample's state and x̂0 at its own step k.

    With ``skip_selected`` G is not evaluated at a sample's own step k (x̂0_sel is None): the
    caller evaluates it there itself, e.g. with gradients for the generator update.
    """
    batch = noise.shape[0]
    last = int(k.max())
    x_in = torch.empty_like(noise)
    x0_sel = None if skip_selected else torch.empty_like(noise)
    idx = torch.arange(batch, device=noise.device)  # samples still rolling out
    x, cond_active = noise, cond
    for j in range(last + 1):
        done = k[idx] == j
        x_in[idx[done]] = x[done]
        if j == last and skip_selected:
            break
        if skip_selected:  # evaluate only the samples that continue past step j
            keep = ~done
            idx, x, cond_active = idx[keep], x[keep], index_cond(cond_active, keep)
            x0 = predict_x0(velocity_fn, x, _times(grid, j, idx.numel()), cond_active)
        else:
            x0 = predict_x0(velocity_fn, x, _times(grid, j, idx.numel()), cond_active)
            assert x0_sel is not None  # allocated when not skip_selected
            x0_sel[idx[done]] = x0[done]
            if j == last:
                break
            if prune and bool(done.any()):
                keep = ~done
                idx, x0, cond_active = idx[keep], x0[keep], index_cond(cond_active, keep)
        # Drawn for the whole batch so that pruning does not shift the RNG stream.
        eps = noise_like(noise, generator)[idx]
        x = renoise(x0, grid[j + 1].expand(idx.numel()), eps)
    return x_in, x0_sel


# --------------------------------------------------------------------------------------------------
# Multi-step Euler ODE sampler (the teacher).
# --------------------------------------------------------------------------------------------------


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Cond,
    *,
    num_steps: int = 50,
    shift: float = 1.0,
    guidance: float = 1.0,
    null_cond: Cond | None = None,
    timesteps: torch.Tensor | None = None,
    batched_cfg: bool = True,
    return_trajectory: bool = False,
) -> torch.Tensor:
    """Deterministic Euler integration of the probability-flow ODE from t = 1 to t = 0.

    ``x ← ε``; for i = 0..N−1: ``x ← x + (t_{i+1} − t_i)·v(x, t_i)`` with
    ``v = v_uncond + w·(v_cond − v_uncond)`` under CFG (no CFG when ``w <= 1``: ``v = v_cond``,
    see :mod:`dmdr_fast.algo.guidance`). Runs in the caller's grad mode; integrate in float32
    noise for an accurate reference, whatever dtype the network computes in.

    Args:
        velocity_fn: the teacher.
        noise: (B, ...) initial noise.
        cond: condition of the batch.
        num_steps: N >= 1 (ignored if ``timesteps`` is given).
        shift: grid shift σ (1 = uniform grid; ignored if ``timesteps`` is given).
        guidance: CFG scale w.
        null_cond: unconditional condition (batch 1 is broadcast); required when ``w > 1``.
        timesteps: optional explicit (N + 1,) grid ending at 0.
        batched_cfg: evaluate cond and uncond in one call of 2B samples (else two calls of B).
        return_trajectory: return the (N + 1, B, ...) stack of states instead of the sample.

    Returns:
        (B, ...) sample at t = 0, or the trajectory (first entry ``noise``, last the sample).
    """
    check_tensor("noise", noise)
    w = check_finite("guidance", guidance)
    if timesteps is None:
        timesteps = few_step_timesteps(check_int("num_steps", num_steps, minimum=1), shift)
    grid = _check_grid(timesteps, noise.device)
    batch = noise.shape[0]
    _check_cond(cond, batch)
    use_cfg = uses_cfg(w)
    if use_cfg:
        if null_cond is None:
            raise ValueError(f"null_cond is required when guidance > 1 (got guidance={w})")
        null_cond = expand_cond(null_cond, batch)
        both = cat_conds([cond, null_cond]) if batched_cfg else None
    x = noise
    states = [x]
    for i in range(grid.numel() - 1):
        t = _times(grid, i, batch)
        if not use_cfg:
            v = velocity_fn(x, t, cond)
        elif batched_cfg:
            v_cond, v_uncond = velocity_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            v = real_velocity(v_cond, v_uncond, w)
        else:
            v = real_velocity(velocity_fn(x, t, cond), velocity_fn(x, t, null_cond), w)
        x = (x + (grid[i + 1] - grid[i]) * v).to(noise.dtype)
        if return_trajectory:
            states.append(x)
    return torch.stack(states) if return_trajectory else x
