"""Differentiable image preprocessing for reward models, done on tensors so gradients reach the images.

Reward models ship PIL-based processors (resize → center-crop → normalise) that cut the graph; the
functions here do the same steps with ``torch.nn.functional`` on ``(B, C, H, W)`` tensors in
``[0, 1]``. Resizing uses bicubic interpolation with antialiasing, which has a backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "center_crop",
    "clip_preprocess",
    "normalize",
    "resize_shorter_side",
    "to_rgb",
]

#: Normalisation of OpenAI CLIP (also used by open_clip ViT-H-14 / HPS, PickScore, the aesthetic head).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: ImageNet normalisation (BLIP / ImageReward use CLIP's; kept for torchvision-style classifiers).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_rgb(images: Tensor) -> Tensor:
    """Repeat a single channel to three; ``(B, 1|3, H, W)`` → ``(B, 3, H, W)``."""
    if images.shape[1] == 3:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"images must have 1 or 3 channels, got {tuple(images.shape)}")


def resize_shorter_side(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resize so that the shorter side is ``size`` (aspect ratio kept), antialiased when shrinking.

    Args:
        images: ``(B, C, H, W)``.
        size: Target length of the shorter side.
        mode: ``"bicubic"`` (CLIP's processors) or ``"bilinear"``.

    Returns:
        ``(B, C, H', W')`` with ``min(H', W') == size``.
    """
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    # Antialias only matters (and is only supported for these modes) when shrinking.
    out = F.interpolate(
        images,
        size=new_hw,
        mode=mode,
        align_corners=False,
        antialias=scale < 1 and mode in ("bilinear", "bicubic"),
    )
    return out


def center_crop(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Central ``size`` crop of ``(B, C, H, W)``; requires H, W ≥ the crop."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"cannot crop {(th, tw)} from images of size {(h, w)}")
    top, left = (h - th) // 2, (w - tw) // 2
    return images[..., top : top + th, left : left + tw]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: Tensor,
    size: int = 224,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """CLIP-style preprocessing of decoded images, differentiable.

    Args:
        images: ``(B, 1|3, H, W)`` in ``[0, 1]``.
        size: The model's input resolution.
        mean, std: Per-channel normalisation.
        crop: Resize the shorter side then center-crop (CLIP); ``False`` resizes straight to
            ``size × size`` (no content lost, aspect ratio changed).
        dtype: Cast the result (e.g. the reward model's dtype); ``None`` keeps the input's.

    Returns:
        ``(B, 3, size, size)`` normalised pixels.
    """
    x = to_rgb(images)
    if crop:
        x = center_crop(resize_shorter_side(x, size), size)
    elif tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = normalize(x, mean, std)
    return x if dtype is None else x.to(dtype)
