"""The networks of a run: the teacher (model), its conditions (data), the student and the critic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dmdr_fast.config.base import ConfigBase
from dmdr_fast.config.engine import NAME_PATTERN, check_range, require

__all__ = ["MAX_STUDENT_STEPS", "CriticConfig", "DataConfig", "LoraSpec", "ModelConfig", "StudentConfig"]

MAX_STUDENT_STEPS = 8


@dataclass(frozen=True)
class LoraSpec(ConfigBase):
    """A LoRA adapter: rank, alpha, initialisation and target modules."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r."})
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "LoRA alpha; the delta is scaled by alpha / rank. null means alpha = rank (scaling 1)."
        },
    )
    init: Literal["gaussian", "kaiming", "normal"] = field(
        default="gaussian",
        metadata={
            "help": "Initialisation of A (B starts at zero, so the adapter starts as a no-op): 'gaussian' = "
            "N(0, 1/r²) (peft 'gaussian', the paper's text-to-image scripts), 'kaiming' = peft's "
            "default, 'normal' = N(0, 1) (the paper's SiT critic)."
        },
    )
    targets: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Module-name patterns to wrap (fnmatch globs, or 're:<regex>'), e.g. "
            "['transformer_blocks.*.attn1.to_q']. Empty = the model family's default targets (DiT: "
            "self-attention q/k/v/out and the feed-forward linears of every block)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", ge=1)
        require(self, "alpha", self.alpha is None or self.alpha > 0, "> 0 or null")
        require(self, "targets", all(t.strip() for t in self.targets), "non-empty patterns")


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """The teacher: which model family to build, from where, and how it reads time."""

    family: str = field(
        default="dit",
        metadata={
            "help": "Model family whose adapter builds the teacher: 'digits' (the embedded digits DiT), 'dit' "
            "(class-conditional diffusers DiTTransformer2DModel), or a text-to-image pipeline folder: 'sd3' "
            "(SD3/SD3.5), 'flux', 'zimage', 'sdxl'."
        },
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "Local pretrained model (a diffusers folder or a checkpoint file). null = build from "
            "'kwargs' (random weights; the digits preset trains this teacher first)."
        },
    )
    kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Free-form constructor arguments for the family's builder (text-to-image: the adapter's "
            "keyword arguments, e.g. {resolution: 1024, max_sequence_length: 128}; Flux: embedded_guidance), "
            "e.g. for 'dit': "
            "{sample_size: 8, patch_size: 2, in_channels: 1, num_layers: 4, num_attention_heads: 4, "
            "attention_head_dim: 16, num_classes: 10}. Plain YAML data only."
        },
    )
    timestep_scale: float = field(
        default=1000.0,
        metadata={
            "help": "The network receives timestep_scale·t for t in [0, 1] (1000 for SD3/DiT-style models)."
        },
    )
    round_timesteps: bool = field(
        default=False,
        metadata={"help": "Round timestep_scale·t to an integer (for models trained on integer timesteps)."},
    )
    pixel_range: tuple[float, float] = field(
        default=(-1.0, 1.0),
        metadata={
            "help": "Value range of decoded samples, mapped linearly to [0, 1] for rewards and images."
        },
    )
    weights_dtype: Literal["fp32", "bf16", "fp16", "fp8"] = field(
        default="fp32",
        metadata={
            "help": "Dtype the pipeline is loaded in (text-to-image families). Frozen parts (teacher, VAE, "
            "text encoders) stay in it; trainable weights are kept in fp32 (a full student/critic is cast "
            "to fp32, LoRA factors are fp32). 'bf16' halves the frozen parts' memory (paper: bf16). 'fp8': "
            "loaded in bf16, then the frozen transformer linears of the teacher/guidance network (and a "
            "LoRA student's shared base) are stored as e4m3 with per-output-channel scales and run as FP8 "
            "GEMMs (docs/fp8.md); a full student or critic stays fp32."
        },
    )
    fp8_backward: Literal["bf16", "fp8"] = field(
        default="bf16",
        metadata={
            "help": "weights_dtype fp8: the GEMM of an FP8 linear's input gradient (the critic LoRA and "
            "the layers upstream need it; weights get none): 'bf16' (dequantised per channel, exact "
            "weights) or 'fp8' (the gradient quantised row-wise to e4m3, one FP8 GEMM)."
        },
    )
    fp8_activations: bool = field(
        default=True,
        metadata={
            "help": "weights_dtype fp8: quantise the linears' inputs too and run FP8 GEMMs (W8A8: memory and "
            "speed). false = weight-only (W8A16): the same memory, GEMMs in the compute dtype, and a DMD "
            "direction as accurate as bf16 when the fake/real scores are close (no CFG; docs/fp8.md)."
        },
    )
    fp8_exclude: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "weights_dtype fp8: module-name patterns (fnmatch) kept in their dtype. null = the "
            "default list (embeddings, the final norm and projection; "
            "dmdr_fast.models.fp8.DEFAULT_FP8_EXCLUDE); a list replaces it ([] quantises every "
            "eligible linear)."
        },
    )
    fp8_weight_only: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "weights_dtype fp8: patterns of linears stored in FP8 but run weight-only. null = the "
            "AdaLN modulation linears (dmdr_fast.models.fp8.DEFAULT_FP8_WEIGHT_ONLY: ~30 % of an MM-DiT's "
            "weights, one row per sample); [] runs them W8A8 too."
        },
    )
    fp8_attention: bool = field(
        default=True,
        metadata={
            "help": "weights_dtype fp8: the guidance network's no-grad passes (the real/fake scores of the "
            "generator step) compute attention with dmdr_fast.ops.attention_fp8; passes that need a "
            "gradient (the critic update) keep the regular attention."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the denoiser's activations in the backward pass (diffusers' own gradient "
            "checkpointing): less memory, about one extra forward of compute."
        },
    )
    vae_slicing: bool = field(
        default=False, metadata={"help": "Decode a batch through the VAE one sample at a time (memory)."}
    )
    vae_tiling: bool = field(
        default=False, metadata={"help": "Decode large images through the VAE in tiles (memory)."}
    )
    tiny_vae: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of a small AutoencoderTiny (e.g. TAESD3 / TAEF1 / TAESDXL) used to decode "
            "samples for the rewards instead of the full VAE (paper SDXL: taesdxl); null = the pipeline's VAE."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "family", bool(NAME_PATTERN.match(self.family)), "a family name such as 'dit'")
        require(self, "path", self.path is None or bool(self.path.strip()), "a non-empty path or null")
        check_range(self, "timestep_scale", gt=0)
        lo, hi = self.pixel_range
        require(self, "pixel_range", lo < hi, "[low, high] with low < high")
        for name in ("fp8_exclude", "fp8_weight_only"):
            patterns = getattr(self, name)
            require(self, name, patterns is None or all(p.strip() for p in patterns), "non-empty patterns")

    @property
    def load_dtype(self) -> str:
        """The dtype name the weights are loaded in: ``weights_dtype``, except bf16 for ``fp8``
        (quantised after loading)."""
        return "bf16" if self.weights_dtype == "fp8" else self.weights_dtype


@dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Where the conditions come from (text-to-image: prompts, optionally pre-encoded in a cache).

    DMDR needs no images: a batch is a set of prompts (or class labels for class-conditional
    teachers, which ignore this section).
    """

    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Training prompts: a .txt (one per line), .jsonl or .csv file (dmdr_fast.data.load_prompts). "
            "Optional when 'cache' is given (the cache stores its prompts)."
        },
    )
    column: str | None = field(
        default=None,
        metadata={"help": "Prompt column of a .jsonl/.csv file; null = the first of prompt, caption, text."},
    )
    cache: str | None = field(
        default=None,
        metadata={
            "help": "A prompt-embedding cache built by `dmdr-fast cache-prompts` (safetensors shards). Training "
            "reads conditions from it instead of running the text encoders; it is refused if it was built "
            "for another model."
        },
    )
    offload_text_encoders: bool = field(
        default=True,
        metadata={
            "help": "With a cache: free the text encoders after loading (rewards still see the prompts), so "
            "they take no GPU memory during training."
        },
    )
    eval_prompts: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Held-out prompts for sample grids and the reward-hacking monitor; empty = the first "
            "training prompts. Encoded once at start (before the text encoders are freed)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts", "cache", "column"):
            value = getattr(self, name)
            require(self, name, value is None or bool(value.strip()), "a non-empty string or null")
        require(self, "eval_prompts", all(p.strip() for p in self.eval_prompts), "non-empty prompts")


@dataclass(frozen=True)
class StudentConfig(ConfigBase):
    """The few-step generator G, initialised from the teacher."""

    kind: Literal["full", "lora"] = field(
        default="full",
        metadata={
            "help": "'full' fine-tunes every weight of a copy of the teacher (paper: SiT, SDXL); 'lora' "
            "trains a LoRA on it (paper: SD3/SD3.5, rank 64, alpha 128)."
        },
    )
    lora: LoraSpec = field(
        default_factory=lambda: LoraSpec(rank=64, alpha=128.0),
        metadata={"help": "The student's LoRA (used when kind = 'lora'). Paper SD3.5: rank 64, alpha 128."},
    )
    num_steps: int = field(
        default=1,
        metadata={
            "help": f"Sampling steps N of the student, 1..{MAX_STUDENT_STEPS} (paper: 1 for SiT/SDXL, 4 for SD3)."
        },
    )
    shift: float = field(
        default=1.0,
        metadata={
            "help": "Shift σ of the few-step grid t_k = σ·s_k / (1 + (σ − 1)·s_k), s_k = 1 − k/N; 1 = uniform "
            "(paper: 1 for SiT, 3 for SD3-M, 5 for SD3.5-L)."
        },
    )
    backward_sim: Literal["trajectory", "final"] = field(
        default="trajectory",
        metadata={
            "help": "Generator input at the picked step k: 'trajectory' = the rollout's own state (DMD2/SiT "
            "backward simulation); 'final' = the final sample re-noised at t_k (paper T2I scripts)."
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "EMA decay of the student's weights in [0, 1); 0 = no EMA (the paper keeps none)."},
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "Start the student from these weights instead of the teacher's. kind = full: the "
            "network's state dict as a .safetensors/.bin/.pt file, a diffusers model folder or a pipeline "
            "folder (e.g. DMD2's ODE-pretrained SDXL UNet, the paper's SDXL start); kind = lora: a LoRA "
            "file or folder (ours or diffusers') with the student LoRA's modules, rank and alpha (e.g. an "
            "earlier export). null = the teacher's weights."
        },
    )
    noise_timestep: int | None = field(
        default=None,
        metadata={
            "help": "SDXL only: the UNet timestep of the student's pure-noise first step (DMD2's 1-step "
            "SDXL and the paper: 399); exports then sample with LCMScheduler timesteps [399, ...]. "
            "null = the last timestep (999)."
        },
    )
    ode_init: str | None = field(
        default=None,
        metadata={
            "help": "A folder of teacher ODE pairs (`dmdr-fast ode-pairs`): before DMD, regress the student's "
            "first step onto the teacher's samples (DMD2's init, the paper's SDXL 1-step recipe); null = start "
            "from the teacher's weights."
        },
    )
    ode_steps: int = field(
        default=1000, metadata={"help": "Optimiser steps of the ODE regression (with ode_init)."}
    )
    ode_lr: float = field(
        default=1e-5, metadata={"help": "Learning rate of the ODE regression (AdamW, its own optimiser)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "num_steps", ge=1, le=MAX_STUDENT_STEPS)
        check_range(self, "shift", gt=0)
        check_range(self, "ema_decay", ge=0, lt=1)
        check_range(self, "ode_steps", ge=1)
        check_range(self, "ode_lr", gt=0)
        if self.noise_timestep is not None:
            check_range(self, "noise_timestep", ge=1)
        require(self, "init", self.init is None or bool(self.init.strip()), "a non-empty path or null")


@dataclass(frozen=True)
class CriticConfig(ConfigBase):
    """The trainable part ψ of the guidance network H(·; λ) (the fake score / critic)."""

    kind: Literal["lora", "full"] = field(
        default="lora",
        metadata={
            "help": "'lora': ONE frozen teacher + a trainable LoRA whose scale picks the role (0 teacher, "
            "λ_f fake, λ_r(s) DynaDG) — two big networks in memory; 'full': a separate fully trainable "
            "copy of the teacher as critic (DMD2's choice; more memory, tracks the student best)."
        },
    )
    lora: LoraSpec = field(
        default_factory=LoraSpec,
        metadata={
            "help": "The critic's LoRA (kind = 'lora'). Paper: rank 32, alpha 32 (scaling 1), gaussian init."
        },
    )
    fake_scale: float = field(
        default=2.0,
        metadata={
            "help": "λ_f: LoRA scale of the fake score H(·; λ_f) (paper: 2.0). Used with kind = 'lora'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "fake_scale", gt=0)
