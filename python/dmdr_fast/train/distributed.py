"""Multi-GPU runs under ``torchrun``: the process group and each rank's device, from the environment.

``torchrun --nproc_per_node 8 -m dmdr_fast.cli train ...`` (or the ``dmdr-fast`` script) starts one
process per GPU with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. :func:`init_from_env` joins
them (NCCL on GPUs, gloo on CPUs) and makes ``cuda:LOCAL_RANK`` the process's device, so that
``train.device: cuda`` / ``auto`` means *this rank's* GPU. The Trainer then wraps the trainable
networks in ``DistributedDataParallel`` (gradients averaged across ranks, each rank drawing its own
batches from ``train.seed + rank``); rank 0 alone writes logs, checkpoints and reports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["init_from_env", "local_device", "rank0_first", "shutdown"]


def init_from_env() -> int:
    """Join the process group ``torchrun`` describes, if any; returns the world size (1: no-op)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend)
    return world


def local_device(name: str) -> torch.device:
    """``train.device`` for this process: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` in a
    multi-process run (every rank on GPU 0 would make NCCL fail), anything explicit is kept."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        local = int(
            os.environ.get("LOCAL_RANK", torch.distributed.get_rank() % max(1, torch.cuda.device_count()))
        )
        return torch.device("cuda", local)
    return torch.device(name)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (e.g. training a teacher into a cache
    that the others then just load); a no-op outside a process group."""
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    if on and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if on and dist.get_rank() == 0:
            dist.barrier()
