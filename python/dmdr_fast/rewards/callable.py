"""Wrap any function ``fn(images, cond) -> (B,)`` as a :class:`~dmdr_fast.rewards.base.Reward`.

For quick experiments and for scorers that are not worth a class (a brightness target, a call into
another library, a non-differentiable judge). The wrapper adds what every reward has: input checks,
the prompt prefix, loss forms, and a check of what ``fn`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.spec import RewardSpec

__all__ = ["CallableReward", "RewardFn"]

#: ``fn(images (B, C, H, W) in [0, 1], cond) -> scores (B,)``.
RewardFn = Callable[[Tensor, RewardCondition], Tensor]


class CallableReward(Reward):
    """A reward whose score is ``fn(images, cond)``.

    ``fn`` receives the images and the condition — for prompt conditions, the list of prompts with
    ``spec.prompt_prefix`` applied. Its output must be a floating-point ``(B,)`` tensor; it is returned as
    float32. With ``differentiable=False`` ``fn`` runs under ``torch.no_grad()`` (its score is only
    logged, or used by a group-relative branch). If ``fn`` is an ``nn.Module`` it is registered as a
    submodule (so ``.to(device)`` moves it) and frozen in place (``requires_grad_(False)``, eval).

    Args:
        fn: The scorer.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (required: there is no
            sensible default name for an arbitrary function).
        differentiable: Whether gradients flow from ``fn``'s output to the images.
        cond_kind: Condition ``fn`` needs: ``"labels"``, ``"prompts"`` or ``"any"`` (also ``None``).
        channels: Required image channels C, if any.
        check_inputs: Validate images and condition on every call (one host sync).
    """

    def __init__(
        self,
        fn: RewardFn,
        *,
        spec: RewardSpec,
        differentiable: bool = True,
        cond_kind: Literal["labels", "prompts", "any"] = "any",
        channels: int | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(images, cond) -> (B,), got {type(fn).__name__}")
        if cond_kind not in ("labels", "prompts", "any"):
            raise ValueError(f"cond_kind must be 'labels', 'prompts' or 'any', got {cond_kind!r}")
        if isinstance(fn, nn.Module):
            fn.requires_grad_(False)
        self.fn = fn  # an nn.Module is registered as a submodule by this assignment
        # Shadows the class attribute: CompositeReward reads it per instance.
        self.differentiable = bool(differentiable)
        self.cond_kind = cond_kind
        self.channels = channels
        self.train(False)  # eval mode for a module fn too

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` (with ``channels`` if set); a condition of ``cond_kind``."""
        check_condition(cond, check_images(images, channels=self.channels), kind=self.cond_kind)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 ``fn(images, cond)`` for images ``(B, C, H, W)``.

        Raises:
            TypeError: ``fn`` did not return a floating-point tensor.
            ValueError: ``fn`` returned a shape other than ``(B,)``.
        """
        if isinstance(cond, Sequence) and not isinstance(cond, (str, bytes, Tensor)):
            cond = self.prompts(cond)
        if self.differentiable:
            out = self.fn(images, cond)
        else:
            with torch.no_grad():
                out = self.fn(images, cond)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            got = f"{out.dtype} tensor" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"reward {self.name!r}: fn must return a floating-point (B,) tensor, got {got}")
        if out.shape != (images.shape[0],):
            raise ValueError(
                f"reward {self.name!r}: fn returned shape {tuple(out.shape)}, expected ({images.shape[0]},)"
            )
        return out.float()

    def extra_repr(self) -> str:
        fn_name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"{super().extra_repr()}, fn={fn_name}, differentiable={self.differentiable}"
