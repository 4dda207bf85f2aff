"""Per-rank memory of a DMDR run: weights, gradients, optimiser states, EMA, activations.

Everything but the activations is counted exactly from the networks (built on the meta device for
real sizes, :mod:`dmdr_fast.plan.architectures`) and the Trainer's rules (``train/trainer.py``):

- the teacher / guidance network is frozen, in ``model.weights_dtype`` (fp8: its linears as e4m3 +
  scales, counted by :func:`dmdr_fast.models.fp8.fp8_plan`);
- trainable weights are fp32 (a full student or critic is cast to fp32; LoRA factors are fp32):
  they are the master weights, 4 bytes, plus a 4-byte gradient and AdamW's two fp32 moments;
- a LoRA student shares the teacher's base tensors under DDP; under FSDP it has its own (sharded)
  copy (train/parallel.py); a full student / full critic is a copy;
- EMA: an fp32 copy of the student's trainable weights when ``student.ema_decay > 0``;
- VAE and text encoders in the load dtype (text encoders dropped with ``data.cache`` +
  ``data.offload_text_encoders``), reward models from a table;
- DDP (N > 1): a gradient bucket per trainable parameter (DDP's flat buckets are not views of
  ``.grad``); FSDP2 (``fully_shard`` per block): teacher, student, critic, EMA and their states are
  1/N per rank, plus the largest block gathered twice (the current one and the prefetched one).

Activations follow the simple model of docs/plan.md §2, with constants measured on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models.fp8 import DEFAULT_FP8_EXCLUDE, DEFAULT_FP8_WEIGHT_ONLY, fp8_plan

__all__ = [
    "ACT",
    "Part",
    "RankMemory",
    "RunMemory",
    "activation_bytes",
    "checkpointed_block_bytes",
    "largest_block_numel",
    "network_bytes",
    "per_rank",
]

#: The activation model's constants, by ``train.precision`` (bf16: counted in 2-byte elements;
#: autocast keeps some fp32), in elements per sample per (token × width) of a block's residual
#: stream. Measured on the CPU DiT of ``tests/plan/measured.py`` (``python tests/plan/measured.py``
#: refits them; docs/plan.md §2): slopes over 4 → 12 blocks (``saved``: the mean of the one- and
#: two-graph fits) and the intercepts. "Activations" there are the peak's bytes minus the state
#: tensors (weights, gradients, AdamW, EMA) alive at that moment.
#: ``saved``: kept for backward per block without checkpointing; ``backward``: transient of a
#: backward pass, in blocks' widths; ``scores``: transient of the generator's no-grad score passes,
#: in blocks' widths. With gradient checkpointing (``backward_sim: final``, what the text-to-image
#: presets use) two candidate peaks: the forwards before the student's backward (no student
#: gradients yet) hold ``ckpt`` per block (its inputs) plus ``ckpt_peak`` blocks' widths; the
#: student's backward (its gradients appearing) holds ``ckpt_block`` widths (a recomputed block).
ACT = {
    "fp32": {
        "saved": 19.4,
        "backward": 11.2,
        "scores": 35.6,
        "ckpt": 1.00,
        "ckpt_peak": 35.6,
        "ckpt_block": 26.3,
    },
    "bf16": {
        "saved": 23.2,
        "backward": 17.3,
        "scores": 39.8,
        "ckpt": 1.01,
        "ckpt_peak": 46.3,
        "ckpt_block": 32.4,
    },
}

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}


@dataclass(frozen=True)
class Part:
    """One group of tensors of a run, per rank before any sharding.

    Attributes:
        name: what it is (``teacher``, ``student LoRA``, ...).
        params: parameters it holds (0 for states).
        nbytes: bytes on one rank under DDP (replicated).
        sharded: whether FSDP shards it 1/N.
        fsdp_only: present only under FSDP (a LoRA student's own frozen base: under DDP it shares
            the teacher's tensors, under FSDP one tensor cannot be in two sharded networks).
    """

    name: str
    params: int
    nbytes: int
    sharded: bool
    fsdp_only: bool = False


@dataclass(frozen=True)
class RunMemory:
    """What one rank holds, before choosing the parallelism.

    Attributes:
        parts: the tensors that live through the run (weights, states).
        trainable_params: parameters that get gradients (student + critic).
        activation_bytes: the estimated peak of activations of one micro-batch.
        block_bytes: bytes of the largest FSDP unit (block) of the sharded networks, unsharded.
        notes: what was counted by table or left out.
        phases: candidate peaks as (activation bytes, student-gradient bytes not allocated yet at
            that moment): the rank's activations are the largest ``bytes − its share of those
            gradients``. Empty: ``activation_bytes`` on every rank.
    """

    parts: tuple[Part, ...]
    trainable_params: int
    activation_bytes: int
    block_bytes: int
    notes: tuple[str, ...] = field(default=())
    phases: tuple[tuple[int, int], ...] = field(default=())


@dataclass(frozen=True)
class RankMemory:
    """Memory of one rank for a parallelism and a GPU count.

    Attributes:
        parallel: ``ddp`` or ``fsdp``.
        gpus: the world size N.
        rows: (name, bytes) per rank.
        total: their sum.
    """

    parallel: str
    gpus: int
    rows: tuple[tuple[str, int], ...]
    total: int


def network_bytes(network: nn.Module, elem: int | None = None) -> tuple[int, int]:
    """(parameters, bytes) of ``network``'s parameters and buffers (``elem``: bytes per element
    instead of each tensor's own dtype; shared tensors count once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*network.parameters(), *network.buffers()]:
        seen.setdefault(id(t), t)
    params = sum(p.numel() for p in {id(p): p for p in network.parameters()}.values())
    nbytes = sum(t.numel() * (elem if elem is not None else t.element_size()) for t in seen.values())
    return params, nbytes


def largest_block_numel(network: nn.Module) -> int:
    """Parameters of the largest FSDP unit: an element of a top-level ``nn.ModuleList`` (transformer
    blocks; UNet down / up blocks), or the whole network when it has none."""
    blocks = [b for child in network.children() if isinstance(child, nn.ModuleList) for b in child]
    if not blocks:
        return sum(p.numel() for p in network.parameters())
    return max(sum(p.numel() for p in b.parameters()) for b in blocks)


def activation_bytes(
    blocks: list[tuple[int, int]],
    batch: int,
    *,
    checkpointing: bool,
    precision: str,
    graphs: int = 1,
    cfg: bool = False,
) -> int:
    """Peak activation bytes of a training micro-batch (docs/plan.md §2).

    Without checkpointing the peak is the larger of two phases of a DMDR iteration: the critic's
    backward while ``graphs`` trainable graphs are held, and the generator's no-grad score passes
    while the student's graph is held; a graph keeps ``saved`` elements per block per
    (token × width). With checkpointing: ``ckpt`` per block plus ``ckpt_peak`` blocks' widths.

    Args:
        blocks: ``(tokens, width)`` of every block's residual stream.
        batch: samples per micro-batch.
        checkpointing: gradient checkpointing.
        precision: ``fp32`` or ``bf16`` (the element size of activations).
        graphs: trainable graphs alive at once in the critic update (2 in ``backward_sim:
            trajectory``, where the student's graph is held through it).
        cfg: the real score runs conditional + unconditional (twice the score transient; not
            measured on the CPU, where the tests run without CFG).
    """
    elem = 2 if precision == "bf16" else 4
    c = ACT["bf16" if elem == 2 else "fp32"]
    total = sum(t * w for t, w in blocks)
    widest = max(t * w for t, w in blocks)
    cfg_extra = c["scores"] * widest if cfg else 0.0  # the doubled real-score pass (not measured)
    if checkpointing:  # the forwards' phase; see checkpointed_phases for the backward's
        return int(elem * batch * (c["ckpt"] * total + c["ckpt_peak"] * widest + cfg_extra))
    critic_phase = graphs * c["saved"] * total + c["backward"] * widest
    scores_phase = c["saved"] * total + c["scores"] * widest + cfg_extra
    return int(elem * batch * max(critic_phase, scores_phase))


def checkpointed_block_bytes(blocks: list[tuple[int, int]], batch: int, *, precision: str) -> int:
    """With gradient checkpointing: activation bytes during the student's backward (one recomputed
    block and the backward's transients, ``ckpt_block`` blocks' widths), when its gradients are
    being allocated (docs/plan.md §2)."""
    elem = 2 if precision == "bf16" else 4
    c = ACT["bf16" if elem == 2 else "fp32"]
    return int(elem * batch * c["ckpt_block"] * max(t * w for t, w in blocks))


def per_rank(run: RunMemory, parallel: str, gpus: int) -> RankMemory:
    """The per-rank rows for ``parallel`` (``ddp`` | ``fsdp``) on ``gpus`` GPUs."""
    rows: list[tuple[str, int]] = []
    for part in run.parts:
        if part.fsdp_only and (parallel != "fsdp" or gpus == 1):  # 1 process: nothing is sharded
            continue
        nbytes = math.ceil(part.nbytes / gpus) if parallel == "fsdp" and part.sharded else part.nbytes
        rows.append((part.name, nbytes))
    if parallel == "ddp" and gpus > 1:
        rows.append(("DDP gradient buckets", 4 * run.trainable_params))
    if parallel == "fsdp" and gpus > 1:
        rows.append(("FSDP gathered blocks (2)", 2 * run.block_bytes))
    act = run.activation_bytes
    if run.phases:  # a phase before the student's backward has no student gradients (1/N under FSDP)
        share = gpus if parallel == "fsdp" else 1
        act = max(a - math.ceil(g / share) for a, g in run.phases)
    rows.append(("activations", act))
    return RankMemory(parallel, gpus, tuple(rows), sum(b for _, b in rows))


def frozen_bytes(config: DMDRTrainerConfig, network: nn.Module, family_is_t2i: bool) -> int:
    """Bytes of the frozen teacher network as the Trainer stores it."""
    dtype = config.model.weights_dtype if family_is_t2i else "fp32"
    _, nbytes = network_bytes(network, _DTYPE_BYTES[dtype])
    if dtype == "fp8":
        network.requires_grad_(False)
        m = config.model
        report = fp8_plan(
            network,
            exclude=m.fp8_exclude if m.fp8_exclude is not None else DEFAULT_FP8_EXCLUDE,
            weight_only=m.fp8_weight_only if m.fp8_weight_only is not None else DEFAULT_FP8_WEIGHT_ONLY,
        )
        # fp8_plan's "before" is the built dtype; the Trainer loads bf16 and then quantises.
        before = report.bytes_before * 2 // next(network.parameters()).element_size()
        nbytes += report.bytes_after - before
    return nbytes


def dtype_bytes(name: str) -> int:
    """Bytes per element of a ``model.weights_dtype`` name as stored (fp8 loads in bf16)."""
    return _DTYPE_BYTES[name]
