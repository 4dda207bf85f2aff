"""JPEG compressibility and incompressibility: DDPO's download-free benchmark rewards.

Score = ∓ the size in kB of the image saved as a JPEG at quality 95 (Black et al., "Training
Diffusion Models with Reinforcement Learning", 2023): ``"compressibility"`` rewards small files
(smooth, flat images), ``"incompressibility"`` large ones (texture, detail). The encoder is PIL's;
the score has no gradient (``differentiable`` is False) and serves group-relative policy
optimisation (docs/method.md §12).
"""

from __future__ import annotations

import io
from typing import Literal

import torch
from torch import Tensor

from dmdr_fast.rewards.base import Reward, RewardCondition
from dmdr_fast.rewards.spec import RewardSpec

__all__ = ["JpegReward", "jpeg_kilobytes"]

JpegDirection = Literal["compressibility", "incompressibility"]


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    """(B,) size in kB (1000 bytes) of each image ``(B, C, H, W)`` in ``[0, 1]`` as a JPEG."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    data = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = []
    for img in data:
        buf = io.BytesIO()
        pil = Image.fromarray(
            img[..., 0] if img.shape[-1] == 1 else img, mode="L" if img.shape[-1] == 1 else "RGB"
        )
        pil.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward(Reward):
    """``−kB`` (compressibility) or ``+kB`` (incompressibility) of the JPEG-encoded image.

    Args:
        direction: ``"compressibility"`` or ``"incompressibility"``.
        quality: JPEG quality (DDPO: 95).
        spec: The reward's spec; ``None``: named after ``direction``.
    """

    differentiable = False

    def __init__(
        self,
        direction: JpegDirection = "compressibility",
        *,
        quality: int = 95,
        spec: RewardSpec | None = None,
    ) -> None:
        if direction not in ("compressibility", "incompressibility"):
            raise ValueError(f"direction must be 'compressibility' or 'incompressibility', got {direction!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        super().__init__(spec=spec if spec is not None else RewardSpec(name=f"jpeg_{direction}"))
        self.direction = direction
        self.quality = quality

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        kb = jpeg_kilobytes(images, self.quality)
        return -kb if self.direction == "compressibility" else kb
