"""Moving tensors to the training device without stalling the host (random draws, cached conditions)."""

from __future__ import annotations

import torch

__all__ = ["host_to_device"]


def host_to_device(out: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Move freshly drawn random numbers to ``device`` without stalling the host.

    A copy from pageable CPU memory to a GPU makes the host wait until the GPU has finished its
    queued work (CUDA synchronises the stream first), which would cost one stall per draw; staged
    through pinned memory the copy is asynchronous (the caching host allocator keeps the pinned
    block alive until the copy has run).
    """
    if device is None:
        return out
    device = torch.device(device)
    if out.device.type == "cpu" and device.type == "cuda":
        # pin_memory() of an already pinned tensor is that tensor: the asynchronous copy would then
        # read memory its owner may overwrite right after this call; stage a private copy instead.
        staged = (out.clone() if out.is_pinned() else out).pin_memory()
        return staged.to(device, non_blocking=True)
    return out.to(device)
