"""LAION aesthetic reward: the improved aesthetic predictor (an MLP) on CLIP ViT-L/14 image embeddings.

The predictor (``sac+logos+ava1-l14-linearMSE.pth`` from christophschuhmann/improved-aesthetic-predictor)
is a stack of linear layers (no activations) applied to the L2-normalised CLIP image embedding; it
rates images on the AVA scale (roughly 1–10, good images ≳ 6). Scores are unconditional: the
condition is accepted and ignored. Differentiable in the images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdr_fast._io import RESAVE_TENSORS, load_safetensors, load_torch_file
from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.clip import (
    CLIP_HUB_ID,
    CLIPModelLike,
    _check_clip_model,
    _looks_like_hub_id,
    clip_image_embeds,
    freeze_model,
    load_clip,
)
from dmdr_fast.rewards.loading import MissingWeightsError
from dmdr_fast.rewards.spec import RewardSpec

__all__ = ["AESTHETIC_MLP_FILENAME", "AESTHETIC_MLP_URL", "AestheticMLP", "AestheticReward"]

#: File name of the published predictor head.
AESTHETIC_MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
#: Where it is published.
AESTHETIC_MLP_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's head: ``(B, D)`` normalised CLIP embedding → ``(B, 1)`` rating.

    Layer layout (and hence state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``) match the published
    checkpoint; the dropouts are inactive in eval mode but keep the indices.

    Args:
        input_dim: D, the CLIP embedding size (768 for ViT-L/14).
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D)`` → ``(B, 1)``."""
        return self.layers(x)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AestheticMLP:
        """Load a head from a ``.pth`` state dict (the published format) or ``.safetensors``.

        The input size is read from ``layers.0.weight``.

        Raises:
            MissingWeightsError: ``path`` does not exist (names the download URL).
            ValueError: The file is not a state dict of this architecture.
        """
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise MissingWeightsError(
                f"aesthetic predictor head not found at {p}. Download {AESTHETIC_MLP_URL} on a machine "
                f"with internet and copy it there"
            )
        if p.suffix == ".safetensors":
            state: Any = load_safetensors(p)
        else:
            state = load_torch_file(p, map_location="cpu", convert=RESAVE_TENSORS)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint wrapping the weights
        if not isinstance(state, dict) or not isinstance(state.get("layers.0.weight"), Tensor):
            raise ValueError(f"{p} is not an aesthetic-predictor state dict (no 'layers.0.weight')")
        head = cls(input_dim=state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head


class AestheticReward(Reward):
    """``score = MLP(normalize(CLIP_image(x)))``: the LAION aesthetic rating of each image.

    The CLIP model is frozen and optionally cast to ``dtype``; the head stays float32 (it is tiny,
    and the rating's resolution matters more than its cost). Scores are float32.

    Args:
        clip_model: A ``transformers`` ``CLIPModel`` (the aesthetic head was trained on OpenAI
            CLIP ViT-L/14, :data:`~dmdr_fast.rewards.clip.CLIP_HUB_ID`).
        mlp: An :class:`AestheticMLP` whose input size is the CLIP projection dim.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (a hinge margin is in rating
            units, e.g. 6.5; ``prompt_prefix`` is unused: the score ignores the condition);
            ``None``: ``RewardSpec(name="aesthetic")``.
        dtype: Cast the CLIP model (e.g. ``torch.bfloat16``).
        crop: CLIP's resize + center-crop (``True``, the reference) or a plain resize.
        check_inputs: Validate images on every call (one host sync).

    Raises:
        ValueError: The head's input size differs from the CLIP embedding size.
    """

    default_name = "aesthetic"
    clip: CLIPModelLike

    def __init__(
        self,
        clip_model: nn.Module,
        mlp: nn.Module,
        *,
        spec: RewardSpec | None = None,
        dtype: torch.dtype | None = None,
        crop: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        _check_clip_model(clip_model)
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"mlp must be an nn.Module, got {type(mlp).__name__}")
        config: Any = clip_model.config  # CLIPConfig
        embed_dim = int(config.projection_dim)
        first = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features != embed_dim:
            raise ValueError(
                f"aesthetic head expects {first.in_features}-dim embeddings but the CLIP model's embedding "
                f"(projection_dim) is {embed_dim}; the published head needs CLIP ViT-L/14 ({CLIP_HUB_ID})"
            )
        self.clip = freeze_model(clip_model, dtype)
        self.mlp = freeze_model(mlp)
        self.crop = crop
        self.image_size = int(config.vision_config.image_size)

    @classmethod
    def from_pretrained(
        cls,
        clip_path: str | os.PathLike[str],
        mlp_path: str | os.PathLike[str] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **reward_kwargs: Any,
    ) -> AestheticReward:
        """Build the reward from a CLIP folder (or hub id) and the head's ``.pth``.

        Args:
            clip_path: CLIP ViT-L/14 ``save_pretrained`` folder or hub id.
            mlp_path: The head's state dict; ``None`` looks for :data:`AESTHETIC_MLP_FILENAME`
                inside a local ``clip_path``.
            device: Move both models there.
            dtype: Cast the CLIP model (the head stays float32).
            **reward_kwargs: Passed to the constructor.

        Raises:
            MissingWeightsError: CLIP or the head not found (names both download sources).
            ValueError: The head does not fit the CLIP embedding size.
        """
        if mlp_path is None:
            local = Path(os.path.expanduser(str(clip_path)))
            if not (local / AESTHETIC_MLP_FILENAME).is_file():
                raise MissingWeightsError(
                    f"aesthetic reward: pass mlp_path= the predictor head {AESTHETIC_MLP_FILENAME} "
                    f"(download {AESTHETIC_MLP_URL}), or put it inside the CLIP folder {local}"
                )
            mlp_path = local / AESTHETIC_MLP_FILENAME
        mlp = AestheticMLP.load(mlp_path)
        source = str(clip_path) if _looks_like_hub_id(clip_path) else CLIP_HUB_ID
        clip_model, _ = load_clip(
            clip_path, what="aesthetic reward (CLIP)", source=source, with_tokenizer=False
        )
        reward = cls(clip_model, mlp, dtype=dtype, **reward_kwargs)
        return reward if device is None else reward.to(device)

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, 1|3, H, W)`` in ``[0, 1]``; any condition (ignored)."""
        batch = check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {tuple(images.shape)}")
        check_condition(cond, batch, kind="any")

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 aesthetic rating of images ``(B, C, H, W)`` in ``[0, 1]``; ``cond`` is ignored."""
        emb = clip_image_embeds(self.clip, images, image_size=self.image_size, crop=self.crop)
        head_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(emb.to(head_dtype)).squeeze(-1).float()
