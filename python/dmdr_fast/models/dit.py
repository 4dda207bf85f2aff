"""Adapter for class-conditional diffusers ``DiTTransformer2DModel`` (flow-matching convention).

What diffusers' DiT does and how the adapter maps it (diffusers 0.42):

- Time: every block's ``CombinedTimestepLabelEmbeddings`` feeds the timestep through a sinusoidal
  ``Timesteps`` projection that accepts float tensors, so ``t ∈ [0, 1]`` is passed as the
  continuous ``timestep_scale·t`` (1000·t by default); ``round_timesteps=True`` rounds it instead
  (docs/method.md §1: "round(1000·t)" for models trained on integer steps).
- Classes: ``num_embeds_ada_norm`` is the number of classes. ``LabelEmbedding`` is built with a
  hard-coded class-dropout probability of 0.1, so its table has ``num_classes + 1`` rows and row
  ``num_classes`` is the null ("∅") class used for classifier-free guidance.
- Its label dropout fires on its own whenever the module is in training mode, independently in
  every block. DMDR trains the student and the critic *without* condition dropout
  (docs/method.md §5.2), so the adapter switches that off (``dropout_prob = 0`` on each ``LabelEmbedding``) and
  offers :meth:`DiTAdapter.drop_labels` for explicit dropout, e.g. when training a teacher.
- Output: ``out_channels = 2·in_channels`` means a learned-sigma head; the first half is the
  prediction and the adapter returns only that.

The network must predict the velocity ``v ≈ ε − x0`` of docs/method.md §1 (as a DiT trained by this
library does). Pretrained DDPM DiTs (ε-prediction on a VP schedule) need a conversion this adapter
does not do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from dmdr_fast.models.protocol import Condition, check_time

__all__ = [
    "DIGITS_DIT",
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_LORA_TARGETS",
    "DiTAdapter",
    "dit_from_config",
    "tiny_dit",
]

#: The digits teacher's DiT (:func:`dit_from_config` arguments): 4 blocks of width 64 (4 heads ×
#: 16) on 2×2 patches of 8×8 images, 10 classes. One home for the recipe and the memory planner.
DIGITS_DIT: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_classes": 10,
    "learned_sigma": False,
}

#: LoRA targets: self-attention q/k/v/out projections of every block.
DIT_ATTENTION_TARGETS: tuple[str, ...] = (
    "transformer_blocks.*.attn1.to_q",
    "transformer_blocks.*.attn1.to_k",
    "transformer_blocks.*.attn1.to_v",
    "transformer_blocks.*.attn1.to_out.0",
)
#: LoRA targets: the two feed-forward linears of every block.
DIT_FEEDFORWARD_TARGETS: tuple[str, ...] = (
    "transformer_blocks.*.ff.net.0.proj",
    "transformer_blocks.*.ff.net.2",
)
#: Attention + feed-forward: the default LoRA targets for DiT students and critics.
DIT_LORA_TARGETS: tuple[str, ...] = DIT_ATTENTION_TARGETS + DIT_FEEDFORWARD_TARGETS

_CONFIG_ALIASES = {"num_classes": "num_embeds_ada_norm"}


class DiTAdapter(nn.Module):
    """A class-conditional ``DiTTransformer2DModel`` behind :class:`FlowModelAdapter`.

    Conditions are int64 class labels of shape ``(B,)``; label ``num_classes`` is the null class.
    The adapter is an ``nn.Module`` holding the transformer as ``.transformer`` so that ``.to``,
    ``.train``, ``state_dict``, ``copy.deepcopy`` and DDP/FSDP wrapping work on it directly;
    ``forward`` is the velocity.

    Args:
        transformer: The diffusers DiT; it must predict velocity (module docstring).
        timestep_scale: The network's timestep is ``timestep_scale · t``.
        round_timesteps: Round the scaled timestep to an integer value (kept as float).
        pixel_range: Value range of (decoded) samples, mapped linearly to ``[0, 1]`` by
            :meth:`decode`; ``(-1, 1)`` for pixel-space models such as the digits preset.
        decoder: Optional differentiable map from samples to images in ``pixel_range`` (e.g. a
            VAE decode including latent scaling); identity when ``None`` (pixel space).
        clamp: Clamp decoded images to ``[0, 1]`` (gradients are zero outside the range).
        builtin_label_dropout: Keep diffusers' automatic 10 % label dropout in training mode.
            Off by default; the transformer's ``LabelEmbedding`` modules are modified in place.
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        *,
        timestep_scale: float = 1000.0,
        round_timesteps: bool = False,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        clamp: bool = True,
        builtin_label_dropout: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(transformer, DiTTransformer2DModel):
            raise TypeError(f"DiTAdapter needs a DiTTransformer2DModel, got {type(transformer).__name__}")
        if not pixel_range[1] > pixel_range[0]:
            raise ValueError(f"pixel_range must be (low, high) with high > low, got {pixel_range}")
        config = transformer.config
        if config.num_embeds_ada_norm is None:
            raise ValueError("DiTAdapter needs a class-conditional DiT (num_embeds_ada_norm is None)")
        self.transformer = transformer
        self.timestep_scale = float(timestep_scale)
        self.round_timesteps = round_timesteps
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1]))
        self.decoder = decoder
        self.clamp = clamp
        self.in_channels = int(config.in_channels)
        self.num_classes = int(config.num_embeds_ada_norm)
        self.patch_size = int(config.patch_size)
        out_channels = transformer.out_channels
        if out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"DiT out_channels must be in_channels or 2·in_channels, got {out_channels}")
        self.learned_sigma = out_channels == 2 * self.in_channels
        embeddings = [m for m in transformer.modules() if isinstance(m, LabelEmbedding)]
        self.has_null_class = all(m.embedding_table.num_embeddings > self.num_classes for m in embeddings)
        if not builtin_label_dropout:
            for m in embeddings:
                m.dropout_prob = 0.0  # only gates the random drop; the null row stays in the table

    # ---- FlowModelAdapter -------------------------------------------------------------------------

    @property
    def network(self) -> DiTTransformer2DModel:
        """The wrapped diffusers transformer."""
        return self.transformer

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` = ``(in_channels, sample_size, sample_size)``."""
        size = int(self.transformer.config.sample_size)
        return (self.in_channels, size, size)

    @property
    def null_class(self) -> int:
        """Index of the null class (``num_classes``)."""
        return self.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` (see :meth:`forward`)."""
        return self(x_t, t, cond)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` at ``x_t``.

        Args:
            x_t: Noisy samples ``(B, C, H, W)`` with ``C = in_channels``, ``H = W`` divisible by the
                patch size.
            t: Times in ``[0, 1]``, shape ``(B,)`` (a float or 0-dim tensor is broadcast).
            cond: Class labels, int64 ``(B,)``, values in ``[0, num_classes]``
                (``num_classes`` = null class). Values are not range-checked here, to avoid a
                device sync; :meth:`encode_condition` checks raw labels.

        Returns:
            Velocity ``(B, C, H, W)`` in the dtype of ``x_t`` (the first half of the channels for a
            learned-sigma model).
        """
        batch = self._check_sample(x_t)
        t = check_time(t, batch, x_t.device)
        labels = self._check_labels(cond, batch)
        timestep = t.float() * self.timestep_scale
        if self.round_timesteps:
            timestep = timestep.round()
        dtype = self.transformer.pos_embed.proj.weight.dtype
        out = self.transformer(x_t.to(dtype), timestep=timestep, class_labels=labels, return_dict=False)[0]
        if self.learned_sigma:
            out = out[:, : self.in_channels]
        return out.to(x_t.dtype)

    def encode_condition(self, raw: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Class labels → int64 ``(B,)`` on the model's device.

        Raises:
            ValueError: If a label is outside ``[0, num_classes)`` or the shape is not ``(B,)``.
        """
        labels = torch.as_tensor(raw, device=self._device())
        if labels.dim() == 0:
            labels = labels.reshape(1)
        if (
            labels.dim() != 1
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.dtype == torch.bool
        ):
            raise ValueError(
                f"class labels must be integers of shape (B,), got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}), got min {int(labels.min())}, "
                f"max {int(labels.max())}; use null_condition() for the unconditional class"
            )
        return labels.long()

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """``(batch_size,)`` int64 tensor filled with the null class ``num_classes``.

        Raises:
            ValueError: If the label tables have no null row (model built without class dropout).
        """
        self._require_null()
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self._device())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → images in ``[0, 1]``: optional ``decoder``, then ``pixel_range`` → ``[0, 1]``.

        Args:
            x: Samples ``(B, C, H, W)``.

        Returns:
            Images ``(B, C_img, H_img, W_img)`` (``(B, 1, 8, 8)`` for digits), differentiable.
        """
        images = self.decoder(x) if self.decoder is not None else x
        low, high = self.pixel_range
        images = (images - low) / (high - low)
        return images.clamp(0.0, 1.0) if self.clamp else images

    # ---- DiT-specific helpers ---------------------------------------------------------------------

    def drop_labels(
        self, labels: torch.Tensor, prob: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace each label by the null class with probability ``prob`` (CFG training).

        Args:
            labels: Int64 labels ``(B,)``.
            prob: Drop probability in ``[0, 1]``.
            generator: Optional RNG on the labels' device.

        Returns:
            New labels ``(B,)``.
        """
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {prob}")
        self._require_null()
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def _device(self) -> torch.device:
        return self.transformer.pos_embed.proj.weight.device

    def _require_null(self) -> None:
        if not self.has_null_class:
            raise ValueError(
                "this DiT's label embedding has no null-class row (it was built without class dropout), "
                "so classifier-free guidance is unavailable"
            )

    def _check_sample(self, x_t: torch.Tensor) -> int:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a (B, C, H, W) tensor, got {shape}")
        _, c, h, w = x_t.shape
        if c != self.in_channels or h != w or h % self.patch_size:
            raise ValueError(
                f"x_t must have {self.in_channels} channels and square sides divisible by patch size "
                f"{self.patch_size}, got shape {tuple(x_t.shape)} (model sample shape {self.sample_shape})"
            )
        return int(x_t.shape[0])

    @staticmethod
    def _check_labels(cond: Condition, batch: int) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.dtype != torch.long or cond.shape != (batch,):
            got = (
                f"{cond.dtype} {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
            )
            raise ValueError(
                f"cond must be int64 class labels of shape ({batch},) (use encode_condition), got {got}"
            )
        return cond


def dit_from_config(config: Mapping[str, Any], *, seed: int | None = None) -> DiTTransformer2DModel:
    """Build a randomly initialised ``DiTTransformer2DModel`` from a config mapping.

    Keys are the constructor arguments of ``DiTTransformer2DModel``, plus the aliases
    ``num_classes`` (= ``num_embeds_ada_norm``) and ``learned_sigma`` (bool: ``out_channels =
    2·in_channels`` if true).

    Args:
        config: Constructor arguments.
        seed: If given, weights are initialised from this seed without touching the global RNG.

    Returns:
        The model, in training mode, fp32, on the CPU.

    Raises:
        ValueError: On unknown keys or conflicting aliases.
    """
    kwargs = dict(config)
    learned_sigma = kwargs.pop("learned_sigma", None)
    for alias, name in _CONFIG_ALIASES.items():
        if alias in kwargs:
            if name in kwargs:
                raise ValueError(f"give either {alias!r} or {name!r}, not both")
            kwargs[name] = kwargs.pop(alias)
    if learned_sigma is not None:
        if "out_channels" in kwargs:
            raise ValueError("give either 'learned_sigma' or 'out_channels', not both")
        in_channels = kwargs.get("in_channels", 4)
        kwargs["out_channels"] = 2 * in_channels if learned_sigma else in_channels
    allowed = set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        valid = sorted(allowed | {"learned_sigma", "num_classes"})
        raise ValueError(f"unknown DiT config keys {unknown}; valid keys: {valid}")
    if seed is None:
        return DiTTransformer2DModel(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiTTransformer2DModel(**kwargs)


def tiny_dit(
    *,
    sample_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    num_classes: int = 10,
    learned_sigma: bool = False,
    seed: int | None = 0,
) -> DiTTransformer2DModel:
    """A small random class-conditional DiT, sized for 8×8 grayscale digits by default.

    Args:
        sample_size: Side of the square input.
        patch_size: Patch side (must divide ``sample_size``).
        in_channels: Input channels.
        num_layers: Transformer blocks.
        num_attention_heads: Attention heads.
        attention_head_dim: Channels per head (width = heads × head dim).
        num_classes: Classes (a null class is added for CFG).
        learned_sigma: Double the output channels (learned-sigma head).
        seed: Initialisation seed (``None``: use the global RNG).

    Returns:
        The model (fp32, CPU, training mode). Call it through :class:`DiTAdapter`, which turns off
        diffusers' implicit 10 % label dropout in training mode; a bare model in training mode
        drops labels at random.
    """
    if sample_size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide sample_size {sample_size}")
    config = {
        "sample_size": sample_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": attention_head_dim,
        "num_classes": num_classes,
        "learned_sigma": learned_sigma,
    }
    return dit_from_config(config, seed=seed)
