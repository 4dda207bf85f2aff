"""Querying the guidance network H(·; λ) and combining its outputs (docs/method.md §5.3, §6).

One frozen teacher plus one LoRA whose per-sample scale λ picks the role: λ_f (default 2.0) is the
fake score (critic), λ_r(s) the DynaDG real score (0 = the teacher). The fake, conditional and
unconditional velocities are computed in **one** forward of size 3B; this module builds that batch
and splits the result.

Classifier-free guidance of the real score, and what "no CFG" means
-------------------------------------------------------------------
``v_real = v_uncond + w·(v_cond − v_uncond)``. **No CFG** means ``v_real = v_cond`` exactly (the
unconditional velocity is not used at all), and it applies whenever ``w <= 1``: at ``w = 1`` the
formula already gives ``v_cond``, and values below 1 (the SiT scripts pass 0 to mean "off") are
read as "off" rather than as a pull toward the unconditional score. Equivalently, the effective
scale is ``max(w, 1)``. :func:`uses_cfg` is the one place that decides it; every sampler, loss,
config check and recipe asks it. Whether the unconditional pass is run at all is decided once from the
*nominal* scale (:attr:`GuidanceScale.enabled`); a per-batch jitter that lands at or below 1 then
just gives ``v_cond`` for that batch. The fake score never uses CFG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dmdr_fast.algo._utils import check_finite, check_like, check_tensor, check_times, rand
from dmdr_fast.conditions import Cond, cat_conds, cond_batch_size

__all__ = [
    "GuidanceBatch",
    "GuidanceQuery",
    "GuidanceScale",
    "concat_guidance_queries",
    "real_velocity",
    "uses_cfg",
]


def uses_cfg(scale: float) -> bool:
    """Whether a guidance scale ``w`` means classifier-free guidance: ``w > 1`` (else ``v = v_cond``)."""
    return scale > 1.0


@dataclass(frozen=True)
class GuidanceScale:
    """CFG scale of the real score with an optional per-batch jitter.

    Attributes:
        scale: nominal guidance w; ``w <= 1`` means no CFG (see the module docstring).
        jitter: δ >= 0; each batch uses ``w + U(−δ, δ)`` (paper T2I: 4.0 ± 0.5). Ignored, and no
            random number drawn, when CFG is off.
    """

    scale: float = 1.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        check_finite("scale", self.scale)
        check_finite("jitter", self.jitter, minimum=0.0)

    @property
    def enabled(self) -> bool:
        """True iff the nominal scale is > 1, i.e. the unconditional velocity must be computed."""
        return uses_cfg(self.scale)

    def sample(self, generator: torch.Generator | None = None) -> float:
        """The guidance scale for one batch.

        Args:
            generator: optional RNG for the jitter (one U[0, 1) draw when CFG is on and δ > 0).

        Returns:
            ``scale + δ·(2u − 1)`` with CFG on, ``scale`` itself when δ = 0, and exactly 1.0 when
            CFG is off (no draw).
        """
        if not self.enabled:
            return 1.0
        if self.jitter == 0.0:
            return float(self.scale)
        u = float(rand((), generator=generator, dtype=torch.float64))
        return float(self.scale + self.jitter * (2.0 * u - 1.0))


def real_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Real-score velocity with CFG: ``v_uncond + w·(v_cond − v_uncond)``, or ``v_cond`` if no CFG.

    No CFG (``v_cond`` returned as is) when ``v_uncond`` is None or ``guidance <= 1``.

    Args:
        v_cond: (B, ...) conditional velocity.
        v_uncond: (B, ...) unconditional velocity, or None.
        guidance: w.

    Returns:
        (B, ...) guided velocity.
    """
    w = check_finite("guidance", guidance)
    check_tensor("v_cond", v_cond)
    if v_uncond is None or not uses_cfg(w):
        return v_cond
    check_like("v_uncond", v_uncond, "v_cond", v_cond)
    return v_uncond + w * (v_cond - v_uncond)


class GuidanceQuery(NamedTuple):
    """One part of a batched guidance-network call: inputs (B, ...), times (B,), condition, λ."""

    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    lora_scale: float


@dataclass(frozen=True)
class GuidanceBatch:
    """Inputs of one batched guidance-network call made of ``num_parts`` parts of B samples.

    Attributes:
        x: (P·B, ...) network inputs, parts stacked along dim 0.
        t: (P·B,) times.
        cond: the parts' conditions concatenated along dim 0 (:func:`cat_conds`).
        lora_scale: (P·B,) float32 per-sample LoRA scale λ, on ``x``'s device.
        num_parts: P.
    """

    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    lora_scale: torch.Tensor
    num_parts: int

    def chunk(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split the network's (P·B, ...) output back into its P parts of (B, ...)."""
        if not isinstance(output, torch.Tensor) or output.shape[:1] != self.x.shape[:1]:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"output must have leading size {self.x.shape[0]} (P·B), got {got}")
        return tuple(output.chunk(self.num_parts, dim=0))


def concat_guidance_queries(queries: Sequence[GuidanceQuery]) -> GuidanceBatch:
    """Stack several guidance queries into one batch: the one route that batches the guidance network.

    The generator step asks ``[fake, cond, uncond]`` at one renoised sample; Decoupled DMD asks
    ``[fake@τ_dm, cond@τ_dm, cond@τ_ca, uncond@τ_ca]``; both are one call of size P·B.

    Args:
        queries: P >= 1 parts, all with the same batch size B and sample shape.

    Returns:
        The concatenated batch; :meth:`GuidanceBatch.chunk` undoes it.
    """
    parts = list(queries)
    if not parts:
        raise ValueError("queries must contain at least one GuidanceQuery")
    x_ref = check_tensor("queries[0].x", parts[0].x)
    batch = x_ref.shape[0]
    scales = []
    for i, q in enumerate(parts):
        check_like(f"queries[{i}].x", q.x, "queries[0].x", x_ref)
        check_times(f"queries[{i}].t", q.t, batch)
        size = cond_batch_size(q.cond)
        if size not in (None, batch):
            raise ValueError(f"queries[{i}].cond has batch size {size}, expected {batch}")
        lam = check_finite(f"queries[{i}].lora_scale", q.lora_scale)
        scales.append(torch.full((batch,), lam, dtype=torch.float32, device=x_ref.device))
    return GuidanceBatch(
        x=torch.cat([q.x for q in parts], dim=0),
        t=torch.cat([q.t for q in parts], dim=0),
        cond=cat_conds([q.cond for q in parts]),
        lora_scale=torch.cat(scales, dim=0),
        num_parts=len(parts),
    )
