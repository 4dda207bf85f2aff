"""Public fused ops. Each op dispatches to a backend (torch, cpp, cuda, triton)."""

from dmdr_fast.ops.dmd_loss import dmd_loss

__all__ = ["dmd_loss"]
