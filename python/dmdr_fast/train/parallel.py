"""Data parallelism under ``torchrun``: DDP (replicated networks) or FSDP2 (sharded per block).

``train.parallel: ddp`` (the default) keeps a full copy of every network on every rank and wraps
the two trainable forwards (student, critic) in ``DistributedDataParallel``; only trained weights
are synchronised. ``train.parallel: fsdp`` applies PyTorch's ``fully_shard`` (FSDP2) to every
big network — the student (full or LoRA), the full critic copy and the frozen teacher/guidance
network: the elements of each top-level ``nn.ModuleList`` (a transformer block, a UNet down/up
block) become one FSDP unit each and the rest (embeddings, final layer) the root unit. Every rank
then holds 1/N of each parameter (and of its gradient, Adam moments and EMA, which follow the
parameters' sharding), and gathers one block at a time for its forward and backward.

Why this is enough for everything the Trainer does (docs/parallel.md):

- The adapters call their network's ``__call__``, so FSDP's forward hooks gather the parameters
  for every forward — with grad or without, with per-sample LoRA scales, under gradient
  checkpointing (the recomputed forward gathers again).
- Gradients are reduce-scattered *averaged* over ranks, as DDP all-reduces them averaged, so the
  optimisers see the same gradient either way; a sharded parameter is a ``DTensor`` and
  ``clip_grad_norm_``, the EMA's ``lerp_`` and the weight swaps work on it shard-locally.
- Collectives need every rank: under FSDP sampling, evaluation, the monitor and the export run on
  all ranks (rank 0 alone writes), see :func:`collective_forwards`.
- A LoRA student shares its frozen base tensors with the teacher under DDP (one copy in memory);
  one tensor cannot belong to two FSDP units, so under FSDP the student gets its own (sharded)
  base: 2/N of the frozen network per rank instead of 1.

Reward models, the VAE and the text encoders are not sharded: they are replicated on every rank
(they are small next to the denoisers and run per rank on the rank's own samples).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "balanced",
    "broadcast_from_rank0",
    "collective_forwards",
    "fsdp_units",
    "gathered_weights",
    "is_sharded",
    "shard_network",
    "wrap_ddp",
]


def collective_forwards(parallel: str, world: int) -> bool:
    """True when every network forward is a collective (FSDP over several ranks): then rank-0-only
    work (sample grids, evaluation, the monitor, exports) must run on all ranks, or it deadlocks."""
    return parallel == "fsdp" and world > 1


T = TypeVar("T")


def balanced(
    run: Callable[[Callable[..., Any]], T],
    velocity: Callable[..., Any],
    calls: int | None,
    example: Callable[[], tuple[Any, ...]],
) -> T:
    """``run(velocity)``, then (``calls`` not None) extra ``velocity`` calls up to ``calls`` in all.

    A rollout that stops after the largest drawn step calls the network a different number of
    times on each rank; under FSDP each call gathers parameters with the other ranks, so all ranks
    must make the same sequence of calls. Collectives match by order, not by content: a rank
    whose rollout ends early makes the missing calls on ``example()`` (a one-sample input, results
    dropped) while the others finish theirs. ``calls`` must be an upper bound known to every rank
    without communicating (agreeing on it would itself be a collective out of sequence): the
    student's step count N. No RNG is drawn, so the run's randomness is unchanged.
    """
    if calls is None:
        return run(velocity)
    made = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal made
        made += 1
        return velocity(*args, **kwargs)

    out = run(counted)
    if made > calls:
        raise RuntimeError(f"{made} network calls, more than the bound {calls} every rank pads to")
    if made < calls:
        args = example()
        with torch.no_grad():
            for _ in range(calls - made):
                velocity(*args)
    return out


def is_sharded(network: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``network``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(network, FSDPModule)


#: Blocks a model's own forward calls into from outside the block (diffusers' DiT computes the
#: AdaLN-Zero conditioning with ``transformer_blocks[0].norm1.emb`` in its top-level forward): they
#: stay in the root unit, whose parameters are gathered for the whole forward.
_CALLED_FROM_ROOT = {"DiTTransformer2DModel": ("transformer_blocks.0",)}


def fsdp_units(network: nn.Module) -> list[nn.Module]:
    """The blocks that become FSDP units: the elements of every top-most ``nn.ModuleList`` that hold
    parameters (``transformer_blocks``, Flux's ``single_transformer_blocks``, a UNet's
    ``down_blocks``/``up_blocks``, Z-Image's ``layers``...). Nested lists (a block's ``to_out``)
    stay inside their block's unit: one all-gather per block, not per linear."""
    keep = {
        id(network.get_submodule(n))
        for cls in type(network).__mro__
        for n in _CALLED_FROM_ROOT.get(cls.__name__, ())
    }
    units: list[nn.Module] = []
    inside: list[str] = []
    for name, module in network.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList):
            inside.append(name)
            units += [m for m in module if id(m) not in keep and any(True for _ in m.parameters())]
    return units


@torch.no_grad()
def broadcast_from_rank0(modules: Iterable[nn.Module]) -> None:
    """Make every rank's parameters and buffers equal to rank 0's (DDP does this at wrap time; FSDP
    does not, and a LoRA initialised from ``seed + rank`` would otherwise differ per shard)."""
    dist = torch.distributed
    seen: set[int] = set()
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                dist.broadcast(tensor.data, src=0)


def shard_network(network: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``fully_shard`` every block of ``network`` (:func:`fsdp_units`) and then its root, in place.

    Args:
        network: A denoiser on ``device``, identical on every rank.
        precision: ``train.precision``: ``"bf16"`` gathers parameters in bf16 for the forwards and
            reduces gradients in fp32 (``MixedPrecisionPolicy``); ``"fp32"`` keeps them as they are.
        device: The rank's device (its type selects the device mesh: CUDA with NCCL, CPU with gloo).

    Returns:
        ``network`` itself, now an ``FSDPModule`` whose parameters are ``DTensor`` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for unit in fsdp_units(network):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    # The root too reshards after every forward (FSDP2 keeps a root gathered until its backward by
    # default): many forwards here are no-grad score queries with no backward to reshard them,
    # and a root left gathered would hand its full tensors to named_parameters() — to the EMA,
    # the weight swaps and the checkpoint — instead of the shards. Costs one small re-gather.
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return network


def wrap_ddp(adapter: nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """``adapter`` in ``DistributedDataParallel`` for its gradient-carrying forwards.

    Only the trained weights need syncing: frozen teacher/VAE/text-encoder tensors are identical on
    every rank and would only be broadcast and bucketed for nothing.
    """
    frozen = [n for n, p in adapter.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in adapter.named_buffers()]
    DDP = nn.parallel.DistributedDataParallel
    if hasattr(DDP, "_set_params_and_buffers_to_ignore_for_model"):
        DDP._set_params_and_buffers_to_ignore_for_model(adapter, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(adapter, device_ids=ids)


@contextlib.contextmanager
def gathered_weights(network: nn.Module) -> Iterator[bool]:
    """The whole of a sharded ``network`` on rank 0, for writing it out (an export).

    A collective: under FSDP every rank enters. Each sharded parameter is all-gathered in turn (one
    at a time on the device, so no rank ever holds a second whole network there) and rank 0 keeps
    it on the CPU: inside the block, rank 0's ``network`` has plain full parameters, so
    ``state_dict()`` and the LoRA helpers see whole tensors; the shards come back on exit. Run no
    forward inside (FSDP's hooks would gather over the swapped tensors). Without sharding: a no-op.

    Yields:
        Whether this rank holds the whole network (rank 0, or any rank when nothing is sharded):
        the one that should write.
    """
    from torch.distributed.tensor import DTensor

    if not is_sharded(network):
        yield True
        return
    rank0 = torch.distributed.get_rank() == 0
    full: dict[int, nn.Parameter | None] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        # modules() and _parameters follow registration order, the same on every rank, so the
        # all-gathers pair up; a parameter shared by two modules is gathered once.
        for module in network.modules():
            for leaf, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in full:
                    whole = param.full_tensor()
                    full[id(param)] = nn.Parameter(whole.cpu(), param.requires_grad) if rank0 else None
                    del whole
                whole_param = full[id(param)]
                if whole_param is not None:
                    swapped.append((module, leaf, param))
                    module._parameters[leaf] = whole_param
    full.clear()  # rank 0's modules hold them now
    try:
        yield rank0
    finally:
        for module, leaf, param in swapped:
            module._parameters[leaf] = param
