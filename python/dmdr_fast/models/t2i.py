"""The shared base of the text-to-image adapters (SD3/SD3.5, Flux, Z-Image, SDXL).

A :class:`TextToImageAdapter` wraps one diffusers pipeline: its denoiser (``network``), the frozen
VAE and text encoders, and the pipeline object (for ``encode_prompt`` and for export). It adds to
the :class:`~dmdr_fast.models.protocol.FlowModelAdapter` protocol what text-to-image training and
export need, so that the Trainer, the prompt cache and the exporter work for every family alike:

- conditions are dataclasses of tensors whose first dimension is the batch, with a *fixed*
  per-sample shape (token sequences are padded to a fixed length), so they concatenate, slice and
  go to disk (:mod:`dmdr_fast.data.prompt_cache`) without family-specific code;
- the null condition (empty prompt) is encoded once and cached; :meth:`set_null_condition` installs
  one read from the prompt cache, after which the text encoders can be dropped
  (:meth:`drop_text_encoders`) to free their memory;
- :meth:`text_fingerprint` identifies what produced the conditions (family, encoder classes and
  configs, tokenizers, sequence length), so a cache built for another model is refused;
- :meth:`export_scheduler` is the scheduler an exported student samples with in plain diffusers, and
  :meth:`few_step_grid` the exact time grid that scheduler visits (the Trainer trains the student on
  it, so the exported pipeline reproduces the training-time sampler);
- :meth:`decode` goes through the VAE (or a small :class:`~diffusers.AutoencoderTiny` installed with
  :meth:`use_tiny_vae`), and :meth:`enable_memory_savers` switches on gradient checkpointing and VAE
  slicing/tiling.

Subclasses set the class attributes and implement :meth:`forward` (the velocity),
:meth:`encode_condition` and, when their pipeline differs from the default, the scheduler hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dmdr_fast._dtypes import load_dtype_kwargs
from dmdr_fast._io import check_no_code, omitted_components
from dmdr_fast.conditions import map_tensors
from dmdr_fast.models.protocol import Condition, check_time

if TYPE_CHECKING:
    from diffusers import ModelMixin

__all__ = ["TextToImageAdapter", "check_time"]

_TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")


def _config_digest(obj: Any) -> str:
    """A short stable hash of a module's or tokenizer's configuration (not of its weights)."""
    config = getattr(obj, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
    elif config is not None:
        data = dict(config)
    else:  # a tokenizer
        data = {"vocab_size": len(obj), "model_max_length": getattr(obj, "model_max_length", None)}
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TextToImageAdapter(nn.Module):
    """Base class of the diffusers text-to-image adapters (see the module docstring).

    Args:
        vae: The pipeline's VAE (``None`` disables :meth:`decode`).
        pipeline: The diffusers pipeline (text encoding, export); ``None`` disables both.
        clamp: Clamp decoded images to ``[0, 1]``.
    """

    #: Model family name (``ModelConfig.family``).
    family: ClassVar[str] = ""
    #: The condition dataclass of the family.
    condition_class: ClassVar[type] = object
    #: Attribute name of the denoiser on the pipeline (and on the adapter).
    network_attr: ClassVar[str] = "transformer"
    #: Default LoRA targets for the student and the critic (module-name globs).
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    #: ``prefix`` of exported LoRA files (what ``pipe.load_lora_weights`` expects).
    lora_prefix: ClassVar[str] = "transformer"
    #: The diffusers pipeline class :meth:`from_pretrained` loads.
    pipeline_class: ClassVar[Any] = None
    #: ``from_pretrained`` arguments the family always passes (overridable by ``pipeline_kwargs``).
    default_pipeline_kwargs: ClassVar[dict[str, Any]] = {}
    #: Whether the constructor takes ``num_train_timesteps`` and ``shift`` from the pipeline's
    #: flow-matching scheduler (SDXL reads its VP schedule itself).
    reads_flow_scheduler: ClassVar[bool] = True

    #: Prompts → a batch of the family's conditions; every subclass defines it.
    encode_condition: Callable[[Sequence[str]], Any]

    def __init__(self, *, vae: ModelMixin | None, pipeline: Any | None, clamp: bool = True) -> None:
        super().__init__()
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
        self.tiny_vae: ModelMixin | None = None
        # Registered so that .to() moves them and make_student shares them instead of copying.
        self.text_encoders = nn.ModuleList(
            [enc for name in _TEXT_ENCODER_NAMES if (enc := getattr(pipeline, name, None)) is not None]
        )
        self.text_encoders.requires_grad_(False)
        self._pipeline = pipeline
        self.clamp = clamp
        self._null: Any = None  # the cached (1, ...) empty-prompt condition
        self._fingerprint: dict[str, Any] | None = None

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipe: Any, *, device: torch.device | str | None = None, **kwargs: Any) -> Any:
        """Build from a diffusers pipeline object (denoiser, VAE, text encoders, scheduler).

        For the flow-matching families ``num_train_timesteps`` and ``shift`` come from the
        pipeline's scheduler unless given; ``kwargs`` are the subclass's constructor arguments. The
        adapter is moved to ``device`` if given and put in eval mode.
        """
        if cls.reads_flow_scheduler:
            config = pipe.scheduler.config if getattr(pipe, "scheduler", None) is not None else {}
            kwargs.setdefault("num_train_timesteps", config.get("num_train_timesteps", 1000))
            kwargs.setdefault("shift", config.get("shift", 1.0))
        # The subclasses' constructors take the denoiser first (the base's takes keywords only).
        build: Callable[..., TextToImageAdapter] = cls
        adapter = build(getattr(pipe, cls.network_attr), vae=pipe.vae, pipeline=pipe, **kwargs)
        if device is not None:
            adapter.to(device)
        return adapter.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a local pipeline folder (or a hub id when online) with the family's pipeline class.

        Args:
            path: The pipeline folder (``model_index.json`` and component subfolders).
            device: Where to put the adapter.
            torch_dtype: Load dtype for all components.
            pipeline_kwargs: Extra ``from_pretrained`` arguments (e.g. ``text_encoder_3=None``).
            **kwargs: Constructor / :meth:`from_pipeline` arguments of the subclass.
        """
        # A part the folder was saved without must be passed as None again (plain diffusers too).
        extra = {**omitted_components(path), **cls.default_pipeline_kwargs, **(pipeline_kwargs or {})}
        extra.update(load_dtype_kwargs(torch_dtype))
        check_no_code(path, "pipeline folder")  # a shared folder's .py files are never imported
        pipe = cls.pipeline_class.from_pretrained(str(path), **extra)
        return cls.from_pipeline(pipe, device=device, **kwargs)

    # ---- protocol members shared by all families ---------------------------------------------------

    @property
    def network(self) -> ModelMixin:
        """The wrapped diffusers denoiser (transformer or UNet)."""
        return getattr(self, self.network_attr)

    @property
    def pipeline(self) -> Any | None:
        """The diffusers pipeline (``None`` if not given)."""
        return self._pipeline

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """Velocity ``v ≈ ε − x0`` (see :meth:`forward`)."""
        return self(x_t, t, cond)

    def null_condition(self, batch_size: int) -> Any:
        """The empty-prompt condition, encoded once and cached, expanded to ``batch_size``.

        The tensors are broadcast views (no copy) of the cached ``(1, ...)`` condition: read-only.
        """
        if self._null is None:
            self._null = self.encode_condition([""])
        device = self._device()  # the cache may have installed it before the adapter moved
        if any(isinstance(v, torch.Tensor) and v.device != device for v in vars(self._null).values()):
            self._null = map_tensors(lambda v: v.to(device), self._null)
        return map_tensors(lambda v: v.expand(batch_size, *v.shape[1:]), self._null)

    def set_null_condition(self, cond: Any) -> None:
        """Install a batch-1 null condition (e.g. from the prompt cache) instead of encoding ``""``."""
        self._check_condition_type(cond)
        if len(cond) != 1:
            raise ValueError(f"the null condition must have batch size 1, got {len(cond)}")
        self._null = map_tensors(lambda v: v.to(self._device()), cond)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents → RGB images in ``[0, 1]``, differentiably (through the tiny VAE if installed).

        Args:
            x: Latents ``(B, *sample_shape)``.

        Returns:
            Images ``(B, 3, H, W)`` in the dtype of ``x``.
        """
        vae = self.tiny_vae if self.tiny_vae is not None else self.vae
        if vae is None:
            raise ValueError(f"this {type(self).__name__} was built without a VAE, so it cannot decode")
        latents = self.unscale_latents(x, vae)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images = (images.to(x.dtype) + 1.0) / 2.0
        return images.clamp(0.0, 1.0) if self.clamp else images

    def unscale_latents(self, x: torch.Tensor, vae: ModelMixin) -> torch.Tensor:
        """Model latents → what ``vae.decode`` takes: ``x / scaling_factor + shift_factor``."""
        config = vae.config
        latents = x / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        return latents + shift if shift is not None else latents

    # ---- memory ------------------------------------------------------------------------------------

    def use_tiny_vae(self, vae: ModelMixin | str | None) -> None:
        """Decode for rewards through a small VAE (e.g. an ``AutoencoderTiny`` such as TAESD3/TAEF1).

        Args:
            vae: The module, a local folder (``AutoencoderTiny.from_pretrained``) or ``None`` to go
                back to the pipeline's VAE. Its config must carry the same ``scaling_factor`` /
                ``shift_factor`` convention as the pipeline's VAE (true for the TAESD family).
        """
        module: ModelMixin | None
        if isinstance(vae, str):
            from diffusers import AutoencoderTiny

            module = AutoencoderTiny.from_pretrained(vae)
        else:
            module = vae
        if module is not None:
            module.requires_grad_(False)
            module.to(self._device()).eval()
        self.tiny_vae = module

    def enable_memory_savers(
        self,
        *,
        gradient_checkpointing: bool = False,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
    ) -> None:
        """Gradient checkpointing of the denoiser (its own diffusers implementation), VAE slicing and tiling."""
        if gradient_checkpointing:
            if not getattr(self.network, "_supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.network).__name__} does not support gradient checkpointing")
            self.network.enable_gradient_checkpointing()
        for flag, method in ((vae_slicing, "enable_slicing"), (vae_tiling, "enable_tiling")):
            if flag and self.vae is not None and hasattr(self.vae, method):
                getattr(self.vae, method)()

    def drop_text_encoders(self) -> None:
        """Free the text encoders (conditions must then come from the prompt cache).

        The null condition is encoded first if it is not cached yet, and the fingerprint is kept.
        """
        if self._null is None and self._pipeline is not None:
            self.null_condition(1)
        self.text_fingerprint()
        for name in _TEXT_ENCODER_NAMES:
            if getattr(self._pipeline, name, None) is not None:
                setattr(self._pipeline, name, None)
        self.text_encoders = nn.ModuleList()
        self._encoders_dropped = True

    @property
    def can_encode(self) -> bool:
        """Whether :meth:`encode_condition` works (a pipeline with its text encoders)."""
        return self._pipeline is not None and not getattr(self, "_encoders_dropped", False)

    def _require_encoders(self) -> Any:
        if self._pipeline is None:
            raise ValueError(
                f"this {type(self).__name__} was built without a pipeline, so it cannot encode prompts"
            )
        if getattr(self, "_encoders_dropped", False):
            raise ValueError(
                "the text encoders were dropped (drop_text_encoders); encode prompts with "
                "`dmdr-fast cache-prompts` and train from the cache"
            )
        return self._pipeline

    # ---- prompt-cache identity -------------------------------------------------------------------

    def text_fingerprint(self) -> dict[str, Any]:
        """What produced the conditions: family, text encoders and tokenizers (configs), settings.

        Two adapters with equal fingerprints encode prompts the same way (same architecture and
        configuration; the weights are identified by the pipeline's files, see the prompt cache).
        """
        if self._fingerprint is None:
            pipe = self._pipeline
            parts: dict[str, Any] = {"family": self.family, **self.condition_settings()}
            for name in (*_TEXT_ENCODER_NAMES, *_TOKENIZER_NAMES):
                obj = getattr(pipe, name, None)
                if obj is not None:
                    parts[name] = f"{type(obj).__name__}:{_config_digest(obj)}"
            self._fingerprint = parts
        return dict(self._fingerprint)

    def condition_settings(self) -> dict[str, Any]:
        """Settings that change the encoded conditions (e.g. the sequence length); for the fingerprint."""
        return {}

    # ---- sampling and export -----------------------------------------------------------------------

    def export_scheduler(self, num_steps: int, shift: float) -> Any:
        """The scheduler an exported N-step student samples with in plain diffusers.

        Default (flow-matching families): ``FlowMatchEulerDiscreteScheduler`` with the pipeline
        scheduler's config, static ``shift``, no dynamic shifting, and stochastic sampling for N > 1
        (``x̂0 = x − σ·v``, then re-noise to the next σ with fresh noise — the DMD few-step sampler).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        base = dict(getattr(getattr(self._pipeline, "scheduler", None), "config", {}) or {})
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        base.update(
            shift=float(shift),
            use_dynamic_shifting=False,
            shift_terminal=None,
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            invert_sigmas=False,
            stochastic_sampling=num_steps > 1,
        )
        return FlowMatchEulerDiscreteScheduler.from_config(base)

    def pipeline_sigmas(self, num_steps: int) -> list[float] | None:
        """The ``sigmas`` the family's pipeline passes to ``set_timesteps`` by default (``None``: none).

        Flux and Z-Image pipelines pass ``linspace(1, 1/N, N)``; SD3's passes none (override).
        """
        return torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()

    def few_step_grid(self, num_steps: int, shift: float) -> torch.Tensor:
        """``(N + 1,)`` times ``1 = t_0 > ... > t_N = 0`` that the exported pipeline visits.

        Computed by running the exported scheduler's ``set_timesteps`` the way the family's pipeline
        calls it, so training and plain-diffusers sampling use the same grid.
        """
        scheduler = self.export_scheduler(num_steps, shift)
        sigmas = self.pipeline_sigmas(num_steps)
        if sigmas is None:
            scheduler.set_timesteps(num_steps)
        else:
            scheduler.set_timesteps(sigmas=sigmas)
        grid = scheduler.sigmas.detach().to(torch.float32).cpu()
        if grid.numel() != num_steps + 1 or grid[-1] != 0 or not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError(f"the exported scheduler gives an unusable grid {grid.tolist()}")
        return grid

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Arguments for ``pipe(prompt, **kwargs)`` that sample the exported student (no CFG)."""
        return {"num_inference_steps": int(num_steps), "guidance_scale": 1.0}

    # ---- helpers ------------------------------------------------------------------------------------

    def _set_resolution(
        self, resolution: int | tuple[int, int] | None, *, default_latent_side: int, multiple: int, why: str
    ) -> None:
        """Set :attr:`vae_scale_factor` (from the VAE; 8 without one) and :attr:`resolution` (pixels).

        Args:
            resolution: Side or ``(height, width)`` in pixels; ``None`` = ``default_latent_side``
                latent pixels.
            multiple: Latent sides must be divisible by it (patch size, Flux's 2×2 packing).
            why: What ``multiple`` is, for the error message.

        Raises:
            ValueError: If a side is not divisible by ``vae_scale_factor · multiple``.
        """
        vae = self.vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        if resolution is None:
            resolution = default_latent_side * self.vae_scale_factor
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        step = self.vae_scale_factor * multiple
        if height % step or width % step:
            raise ValueError(f"resolution {height}×{width} must be divisible by {step} ({why})")
        self.resolution = (int(height), int(width))

    def shift_time(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """The time shift ``s·t / (1 + (s − 1)·t)`` with ``s = shift`` (default :attr:`shift`)."""
        s = float(getattr(self, "shift", 1.0)) if shift is None else float(shift)
        return s * t / (1.0 + (s - 1.0) * t)

    def _check_sample(self, x_t: torch.Tensor) -> int:
        """Batch size of ``x_t``, checked to be ``(B, C, H, W)`` latents with sides divisible by the patch."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a (B, C, H, W) tensor, got {shape}")
        _, c, h, w = x_t.shape
        patch = int(getattr(self, "patch_size", 1))
        if c != self.in_channels or h % patch or w % patch:
            raise ValueError(
                f"x_t must have {self.in_channels} channels and sides divisible by patch size "
                f"{patch}, got shape {tuple(x_t.shape)} (sample shape {self.sample_shape})"
            )
        return int(x_t.shape[0])

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def _check_condition_type(self, cond: Any) -> None:
        if not isinstance(cond, self.condition_class):
            raise ValueError(
                f"cond must be a {self.condition_class.__name__} (use encode_condition), got {type(cond).__name__}"
            )
