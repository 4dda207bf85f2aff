"""Public fused ops. Each op dispatches to a backend (torch, cpp, cuda, triton)."""

from dmdr_fast.ops.dmd_loss import dmd_loss
from dmdr_fast.ops.reward_grad import RewardGradStats, reward_grad_combine

__all__ = ["RewardGradStats", "dmd_loss", "reward_grad_combine"]
