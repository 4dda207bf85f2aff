"""Public fused ops. Each op dispatches to a backend (torch, cpp, cuda, triton; sdpa/xformers for attention)."""

from dmdr_fast.ops.attention import attention, attention_fp8
from dmdr_fast.ops.dmd_loss import dmd_loss
from dmdr_fast.ops.reward_grad import RewardGradStats, reward_grad_combine

__all__ = ["RewardGradStats", "attention", "attention_fp8", "dmd_loss", "reward_grad_combine"]
