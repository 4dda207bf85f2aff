"""Measured peak memory of real CPU Trainer runs on tiny DiTs, and the planner's estimate of them.

Used by ``test_validation.py``; run it directly to re-measure the activation constants of
:mod:`dmdr_fast.plan.memory` (docs/plan.md §2)::

    OMP_NUM_THREADS=1 python tests/plan/measured.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.plan.measure import LiveTensorBytes
from dmdr_fast.plan.memory import per_rank
from dmdr_fast.plan.runs import run_memory
from dmdr_fast.train import ClassLabelSampler, Trainer

TARGETS = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0", "*ff.net.0.proj", "*ff.net.2"]
#: A DiT big enough that states and activations dwarf the rest: 64 tokens × width 128, 4 blocks.
ARCH = {
    "sample_size": 16,
    "patch_size": 2,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
}


@dataclass(frozen=True)
class Measured:
    """One run: measured peak and states, and the planner's numbers for it (bytes)."""

    peak: int
    states: int
    objects: int
    activations: int
    estimate_activations: int
    estimate: int
    estimate_states: int


def config(
    batch: int,
    *,
    precision: str = "fp32",
    checkpointing: bool = False,
    student: str = "full",
    backward_sim: str = "trajectory",
    ema: float = 0.0,
) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict({
        "model": {"family": "dit", "gradient_checkpointing": checkpointing},
        "train": {"max_steps": 4, "batch_size": batch, "log_every": 1, "sample_every": 0, "eval_every": 0,
                  "checkpoint_every": 0, "tensorboard": False, "device": "cpu", "precision": precision},
        "dmdr": {"dynamic_horizon": 4, "ratio_update": 2},
        "critic": {"lora": {"rank": 8, "targets": TARGETS}},
        "student": {"kind": student, "num_steps": 2, "backward_sim": backward_sim, "ema_decay": ema,
                    "lora": {"rank": 8, "targets": TARGETS}},
    })  # fmt: skip


def measure(cfg: DMDRTrainerConfig, steps: int = 4) -> Measured:
    """Build the Trainer and run ``steps`` iterations under :class:`LiveTensorBytes`."""
    with LiveTensorBytes(record=True) as m:
        net = tiny_dit(**ARCH, seed=0)
        if cfg.model.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        trainer = Trainer(cfg, DiTAdapter(net), data=ClassLabelSampler(10))
        for i in range(steps):
            if i == steps - 1:  # the peak of the last iteration (a generator step): its state
                m.reset_peak()  # tensors are the ones still alive at the end
            trainer.step()
        states = m.sweep()
    tensors = _state_tensors(trainer)
    plan = run_memory(cfg, tiny_dit(**ARCH, seed=0))
    est = per_rank(plan, "ddp", 1)
    return Measured(
        peak=m.peak,
        states=states,
        objects=sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values()),
        activations=m.peak - m.bytes_at_peak(tensors),
        estimate_activations=plan.activation_bytes,
        estimate=est.total,
        estimate_states=est.total - plan.activation_bytes,
    )


def _state_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """The networks' weights and buffers, their gradients, the optimisers' states and the EMA:
    what the planner counts as states, read off the objects."""
    tensors = []
    for net in (trainer.student.network, trainer.guidance.network):
        for p in net.parameters():
            tensors += [p] + ([p.grad] if p.grad is not None else [])
        tensors += list(net.buffers())
    for opt in (trainer.opt_g, trainer.opt_c):
        tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    tensors += list((trainer.ema or {}).values())
    return tensors


def _units(layers: int) -> tuple[int, int]:
    from dmdr_fast.plan.architectures import tokens_and_width

    blocks = tokens_and_width(tiny_dit(**{**ARCH, "num_layers": layers}, seed=0), 0, 0)
    return sum(t * w for t, w in blocks), max(t * w for t, w in blocks)


def _per_sample(layers: int, batch: int, elem: int, **kw: object) -> tuple[int, int, float]:
    """(U, W, measured activation elements per sample) of one run with ``layers`` blocks."""
    global ARCH
    base, ARCH = ARCH, {**ARCH, "num_layers": layers}
    try:
        r = measure(config(batch, **kw))  # type: ignore[arg-type]
    finally:
        ARCH = base
    units, widest = _units(layers)
    return units, widest, r.activations / (elem * batch)


def _fit(elem: int, batches: tuple[int, int] = (16, 16), **kw: object) -> tuple[float, float]:
    """Slope over U and intercept over W of the measured activations, 4 → 12 blocks (at
    ``batches``: a larger batch for more blocks keeps the peak in the same phase)."""
    u0, w, e0 = _per_sample(4, batches[0], elem, **kw)
    u1, _, e1 = _per_sample(12, batches[1], elem, **kw)
    slope = (e1 - e0) / (u1 - u0)
    return slope, (e0 - slope * u0) / w


def calibrate() -> None:
    """Print the activation constants fitted to measured peaks (docs/plan.md §2).

    ``backward_sim: final`` peaks in the generator's score passes (one graph: ``saved`` and
    ``scores``); ``trajectory`` in the critic's backward with two graphs (2 ``saved`` and
    ``backward``). With checkpointing (``final``) two phases, each measured where it is the peak:
    the forwards at large batches (``ckpt`` per block, ``ckpt_peak``), the student's backward at
    small ones (``ckpt_block``: the larger of 4 blocks × batch 8 and 12 blocks × batch 16).
    """
    for prec, elem in (("fp32", 4), ("bf16", 2)):
        saved, scores = _fit(elem, precision=prec, backward_sim="final")
        saved2, backward = _fit(elem, precision=prec, backward_sim="trajectory")
        ckpt = {"precision": prec, "backward_sim": "final", "checkpointing": True}
        per_block, forwards = _fit(elem, (32, 64), **ckpt)
        block = max(_per_sample(n, b, elem, **ckpt)[2] / _units(n)[1] for n, b in ((4, 8), (12, 16)))
        print(
            f"{prec}: saved {saved:.2f} (trajectory: {saved2 / 2:.2f} per graph), scores {scores:.1f}, "
            f"backward {backward:.1f}, ckpt {per_block:.2f}, ckpt_peak {forwards:.1f}, ckpt_block {block:.1f}"
        )


if __name__ == "__main__":
    calibrate()
