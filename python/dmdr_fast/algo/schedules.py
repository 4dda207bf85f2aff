"""Time grids and training schedules of DMDR (docs/method.md §3–§4): the few-step grid, DynaRS and DynaDG.

Every training schedule is keyed on ``step`` = *s*, the number of generator updates done so far
(not the number of critic updates; docs/method.md §5), and anneals with the cosine progress

    c(s) = ½·(1 + cos(π·min(s/S, 1)))            (1 at s = 0, 0 from s = S on)

where S is the schedule's ``horizon``; ``horizon = 0`` disables the schedule (c ≡ 0, i.e. the
finished state: uniform renoise times, teacher as real score).

Randomness always comes from an optional ``torch.Generator`` so that runs are reproducible. Beta
variates are built from two Gamma variates drawn with Marsaglia and Tsang's method on top of the
generator, because ``torch.distributions.Beta`` cannot take a generator.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dmdr_fast.algo._utils import check_finite, check_int, draw_device, rand, randn

__all__ = [
    "DynaDG",
    "DynaRS",
    "cosine_progress",
    "dynadg_real_scale",
    "dynars_beta_params",
    "few_step_timesteps",
    "sample_beta",
    "sample_gamma",
]

RenoiseMode = Literal["beta", "uniform"]
_RENOISE_MODES = ("beta", "uniform")


def _check_step(step: object) -> int:
    """Generator-update counter: a non-negative integer (numpy integers accepted)."""
    if isinstance(step, bool):
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    try:
        value = operator.index(step)  # type: ignore[arg-type]  # any object: index() raises TypeError
    except TypeError:
        raise TypeError(f"step must be a non-negative int, got {type(step).__name__} ({step!r})") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Few-step grid.
# --------------------------------------------------------------------------------------------------


def few_step_timesteps(
    num_steps: int,
    shift: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Shifted few-step time grid ``t_0 = 1 > t_1 > ... > t_N = 0``.

    ``s_k = 1 − k/N`` and ``t_k = σ·s_k / (1 + (σ − 1)·s_k)`` for k = 0..N−1, ``t_N = 0``. A
    shift σ > 1 spends more steps at high noise (SD3 uses 3, SD3.5-Large 5); σ = 1 is the uniform
    grid ``1 − k/N``, which is also the grid of the multi-step Euler sampler.

    Args:
        num_steps: number of steps N >= 1.
        shift: σ > 0.
        dtype: floating dtype of the result (computed in float64 first).
        device: device of the result.

    Returns:
        (N + 1,) tensor of times, strictly decreasing from 1 to 0.
    """
    n = check_int("num_steps", num_steps, minimum=1)
    sigma = check_finite("shift", shift, minimum=0.0, strict=True)
    s = 1.0 - torch.arange(n, dtype=torch.float64) / n
    t = sigma * s / (1.0 + (sigma - 1.0) * s)
    return torch.cat([t, t.new_zeros(1)]).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Cosine progress and the two dynamic schedules.
# --------------------------------------------------------------------------------------------------


def cosine_progress(step: int, horizon: int) -> float:
    """Cosine annealing factor ``c(s) = ½·(1 + cos(π·min(s/S, 1)))``.

    Args:
        step: s, generator updates so far (>= 0).
        horizon: S >= 0; 0 disables the schedule, which counts as finished (c = 0).

    Returns:
        c(s) in [0, 1]: 1 at s = 0, ½ at s = S/2, 0 for s >= S.
    """
    s = _check_step(step)
    horizon = check_int("horizon", horizon, minimum=0)
    if horizon == 0 or s >= horizon:
        return 0.0  # exact zero, not ½·(1 + cos π) rounding
    return 0.5 * (1.0 + math.cos(math.pi * s / horizon))


def dynars_beta_params(step: int, horizon: int, a: float = 4.0, b: float = 1.5) -> tuple[float, float]:
    """DynaRS Beta parameters ``(1 + (a − 1)·c(s), 1 + (b − 1)·c(s))``.

    With the defaults this is Beta(4, 1.5) at s = 0 (mean ≈ 0.73: mostly high noise, so the
    student first learns global structure) and Beta(1, 1) = U(0, 1) from s = S on.

    Args:
        step: s, generator updates so far.
        horizon: S (0 = disabled ⇒ Beta(1, 1)).
        a: first Beta parameter at s = 0, > 0.
        b: second Beta parameter at s = 0, > 0.

    Returns:
        ``(alpha, beta)``, both > 0.
    """
    a = check_finite("a", a, minimum=0.0, strict=True)
    b = check_finite("b", b, minimum=0.0, strict=True)
    c = cosine_progress(step, horizon)
    return 1.0 + (a - 1.0) * c, 1.0 + (b - 1.0) * c


def dynadg_real_scale(step: int, horizon: int, scale0: float) -> float:
    """DynaDG LoRA scale of the real score, ``λ_r(s) = λ_r0·c(s)``.

    Early on the real score is the teacher moved part of the way toward the critic (the LoRA
    tracks the student), which keeps the first updates small; from s = S on it is the teacher.

    Args:
        step: s, generator updates so far.
        horizon: S (0 = disabled ⇒ λ_r = 0).
        scale0: λ_r0 >= 0 (0.75 class-conditional, 0.5 text-to-image in the paper).

    Returns:
        λ_r(s) in [0, λ_r0].
    """
    scale0 = check_finite("scale0", scale0, minimum=0.0)
    return scale0 * cosine_progress(step, horizon)


# --------------------------------------------------------------------------------------------------
# Gamma and Beta variates with a generator.
# --------------------------------------------------------------------------------------------------

# Acceptance of Marsaglia–Tsang is >= 95 % per draw for every shape >= 1, so after this many
# rounds an unfinished element means the input was broken, not bad luck.
_MAX_GAMMA_ROUNDS = 64


def sample_gamma(concentration: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma(α, 1) variates, one per element of ``concentration``, reproducible with a generator.

    Marsaglia & Tsang (2000): for α >= 1 with ``d = α − 1/3``, ``c = 1/√(9d)``, draw
    ``x ~ N(0, 1)``, ``v = (1 + c·x)³`` and ``u ~ U(0, 1)``; accept ``d·v`` if ``v > 0`` and
    ``log u < x²/2 + d − d·v + d·log v``. Rejected elements are redrawn, vectorised over the whole
    tensor. For α < 1 a Gamma(α + 1) variate is multiplied by ``u^(1/α)``.

    Computed in float64 on the generator's device; the result is float64 on that device too.

    Args:
        concentration: (...) shape parameters α > 0.
        generator: optional RNG.

    Returns:
        (...) float64 Gamma variates, > 0.
    """
    if not isinstance(concentration, torch.Tensor):
        raise TypeError(f"concentration must be a torch.Tensor, got {type(concentration).__name__}")
    where = draw_device(generator, concentration.device)
    alpha = concentration.detach().to(device=where, dtype=torch.float64)
    if not bool(torch.isfinite(alpha).all()) or not bool((alpha > 0).all()):
        raise ValueError("concentration must be finite and > 0 everywhere")
    flat = alpha.reshape(-1)
    boost = flat < 1
    shape_ge1 = torch.where(boost, flat + 1.0, flat)
    d = shape_ge1 - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(flat)
    pending = torch.arange(flat.numel(), device=flat.device)
    for _ in range(_MAX_GAMMA_ROUNDS):
        if pending.numel() == 0:
            break
        x = randn((pending.numel(),), generator=generator, device=flat.device, dtype=torch.float64)
        u = rand((pending.numel(),), generator=generator, device=flat.device, dtype=torch.float64)
        dp, cp = d[pending], c[pending]
        v = (1.0 + cp * x) ** 3
        log_v = torch.log(torch.clamp(v, min=torch.finfo(torch.float64).tiny))
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dp - dp * v + dp * log_v)
        out[pending[ok]] = dp[ok] * v[ok]
        pending = pending[~ok]
    if pending.numel() != 0:
        raise RuntimeError("sample_gamma: rejection sampling did not terminate; check concentration")
    # Drawn for every element (not only boosted ones) so the RNG stream does not depend on α.
    u = rand((flat.numel(),), generator=generator, device=flat.device, dtype=torch.float64)
    out = torch.where(boost, out * u ** (1.0 / flat), out)
    return out.reshape(alpha.shape)


def sample_beta(
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    shape: int | Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Beta(α, β) variates as ``X / (X + Y)`` with ``X ~ Gamma(α)``, ``Y ~ Gamma(β)``.

    Args:
        alpha: α > 0, a float or a tensor broadcastable to ``shape``.
        beta: β > 0, a float or a tensor broadcastable to ``shape``.
        shape: output shape (an int for a vector).
        generator: optional RNG; all α-Gammas are drawn before all β-Gammas.
        device: device of the result.
        dtype: dtype of the result (sampling runs in float64).

    Returns:
        ``shape`` tensor with values in [0, 1].
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    where = draw_device(generator, device)
    a = torch.as_tensor(alpha, dtype=torch.float64, device=where).expand(shape)
    b = torch.as_tensor(beta, dtype=torch.float64, device=where).expand(shape)
    x = sample_gamma(a, generator=generator)
    y = sample_gamma(b, generator=generator)
    out = x / (x + y)
    return out.to(dtype=dtype, device=device if device is not None else out.device)


# --------------------------------------------------------------------------------------------------
# Schedule objects used by the trainer.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynaRS:
    """Dynamic renoise sampling: the law of the critic's times and of the DMD renoise times.

    Attributes:
        horizon: S, generator updates over which the Beta law anneals to uniform (0 = disabled).
        a: first Beta parameter at s = 0 (paper: 4).
        b: second Beta parameter at s = 0 (paper: 1.5).
        mode: ``"beta"``: ``τ ~ Beta(1 + (a − 1)·c(s), 1 + (b − 1)·c(s))`` (the paper code calls
            this "logit_normal"); ``"uniform"``: ``τ ~ U[t_min, 1)`` whatever the step (the paper's
            stage-2 and SDXL setting).
        t_min: lower end of the uniform mode (paper code: 0.001); unused by ``"beta"``, which is
            not clipped (the authors' code has no 0.02–0.98 clipping, unlike DMD2).
    """

    horizon: int = 10_000
    a: float = 4.0
    b: float = 1.5
    mode: RenoiseMode = "beta"
    t_min: float = 0.001

    def __post_init__(self) -> None:
        check_int("horizon", self.horizon, minimum=0)
        check_finite("a", self.a, minimum=0.0, strict=True)
        check_finite("b", self.b, minimum=0.0, strict=True)
        if self.mode not in _RENOISE_MODES:
            raise ValueError(f"mode must be one of {_RENOISE_MODES}, got {self.mode!r}")
        t_min = check_finite("t_min", self.t_min, minimum=0.0)
        if t_min >= 1.0:
            raise ValueError(f"t_min must be < 1, got {t_min}")

    def beta_params(self, step: int) -> tuple[float, float]:
        """Beta parameters at generator step ``step`` (mode ``"beta"``)."""
        return dynars_beta_params(step, self.horizon, self.a, self.b)

    def sample(
        self,
        batch_size: int,
        step: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw one renoise time per sample.

        Args:
            batch_size: B >= 1.
            step: s, generator updates so far.
            generator: optional RNG.
            device: device of the result.
            dtype: floating dtype of the result.

        Returns:
            (B,) times: in [0, 1] for ``"beta"``, in [t_min, 1) for ``"uniform"``.
        """
        check_int("batch_size", batch_size, minimum=1)
        _check_step(step)
        if self.mode == "uniform":
            u = rand((batch_size,), generator=generator, device=device, dtype=torch.float64)
            return (self.t_min + (1.0 - self.t_min) * u).to(dtype)
        alpha, beta = self.beta_params(step)
        return sample_beta(alpha, beta, batch_size, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class DynaDG:
    """Dynamic distribution guidance: the LoRA scale of the guidance network's real score.

    Attributes:
        scale0: λ_r0 >= 0 (paper: 0.75 class-conditional, 0.5 text-to-image; 0 disables).
        horizon: S, generator updates over which λ_r anneals to 0 (0 = disabled ⇒ λ_r ≡ 0).
    """

    scale0: float = 0.75
    horizon: int = 10_000

    def __post_init__(self) -> None:
        check_finite("scale0", self.scale0, minimum=0.0)
        check_int("horizon", self.horizon, minimum=0)

    def real_scale(self, step: int) -> float:
        """``λ_r(s) = λ_r0·c(s)`` at generator step ``step``."""
        return dynadg_real_scale(step, self.horizon, self.scale0)
