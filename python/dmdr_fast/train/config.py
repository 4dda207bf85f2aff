"""The DMDR training configuration: frozen, validated dataclasses (DESIGN §1, PAPER_NOTES).

The root is :class:`DMDRTrainerConfig`::

    name
    model    ModelConfig    which teacher family to build and how it maps time
    data     DataConfig     prompts and the prompt-embedding cache (text-to-image)
    student  StudentConfig  the few-step generator G (full or LoRA), N steps, shift, EMA
    critic   CriticConfig   the guidance network's trainable part ψ and the fake scale λ_f
    dmdr     DMDRConfig     the method: CFG of the real score, DynaDG/DynaRS, R, stages, weights
    optim    OptimConfig    the two AdamW optimisers (generator and critic), stage-2 LRs, clipping
    rewards  tuple[RewardConfig, ...]  reward models, weights and how they combine with DMD
    monitor  MonitorConfig  the reward-hacking monitor (held-out score, diversity, cosine)
    train    TrainConfig    steps, batch, seed, precision, logging/eval/checkpoint cadence, device

Defaults follow the authors' released recipe (PAPER_NOTES "TL;DR"; the 1-step SiT-XL/2 stage 1:
20k generator steps at LR 2e-5, S = 10k, λ_r0 = 0.75, no CFG, R = 5, clip 1.0, no EMA), except
the critic's learning rate, which follows DESIGN §1's practical note (a LoRA critic at 10× the
generator's LR), and ``dmdr.cold_start_steps = 0`` (rewards, when any are configured, act from the
start; the paper's two-stage run sets it to the length of stage 1). Every field carries help text (``field(metadata={"help": ...})``), and
``describe(DMDRTrainerConfig)`` lists them all with types and defaults.
Load and override with :mod:`dmdr_fast.train.config_io`::

    cfg = DMDRTrainerConfig.load_yaml("digits.yaml", overrides=["student.num_steps=4"])
    cfg.save_yaml(out_dir / "config.yaml")

All counts of "steps" are **generator updates** (the schedules' s); one generator update takes
``dmdr.ratio_update`` critic updates (PAPER_NOTES §10 item 6).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dmdr_fast.train.config_io import ConfigBase, ConfigError, check_range, require

if TYPE_CHECKING:
    from dmdr_fast.algo import DynaDG, DynaRS, GuidanceScale
    from dmdr_fast.models.lora import LoraConfig

__all__ = [
    "CriticConfig",
    "DMDRConfig",
    "DMDRTrainerConfig",
    "DataConfig",
    "LoraSpec",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "RewardConfig",
    "StudentConfig",
    "TrainConfig",
]

MAX_STUDENT_STEPS = 8
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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

    def to_lora_config(self, adapter: str = "default", default_targets: Sequence[str] = ()) -> LoraConfig:
        """The :class:`dmdr_fast.models.lora.LoraConfig` to inject.

        Args:
            adapter: Adapter name (a Python identifier), e.g. ``"student"`` or ``"critic"``.
            default_targets: The family's targets, used when :attr:`targets` is empty.

        Returns:
            The LoRA config.

        Raises:
            ConfigError: If both :attr:`targets` and ``default_targets`` are empty.
        """
        from dmdr_fast.models.lora import LoraConfig

        targets = self.targets or tuple(default_targets)
        if not targets:
            raise ConfigError(
                "is empty and the model family gives no default targets; list module-name patterns",
                field="targets",
                owner=type(self).__name__,
            )
        return LoraConfig(targets=targets, rank=self.rank, alpha=self.alpha, init=self.init, adapter=adapter)


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
    weights_dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={
            "help": "Dtype the pipeline is loaded in (text-to-image families). Frozen parts (teacher, VAE, "
            "text encoders) stay in it; trainable weights are kept in fp32 (a full student/critic is cast "
            "to fp32, LoRA factors are fp32). 'bf16' halves the frozen parts' memory (paper: bf16)."
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
        require(self, "family", bool(_IDENTIFIER.match(self.family)), "a family name such as 'dit'")
        require(self, "path", self.path is None or bool(self.path.strip()), "a non-empty path or null")
        check_range(self, "timestep_scale", gt=0)
        lo, hi = self.pixel_range
        require(self, "pixel_range", lo < hi, "[low, high] with low < high")


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


@dataclass(frozen=True)
class DMDRConfig(ConfigBase):
    """The method (DESIGN §1): real-score guidance, DynaDG/DynaRS, two time scales, stages, weights."""

    guidance: float = field(
        default=1.0,
        metadata={
            "help": "CFG scale w of the real score, v_real = v_uncond + w·(v_cond − v_uncond); w <= 1 = no "
            "CFG (paper: none for SiT, 4.0 for SD3.5-L, 7.0 for SD3-M/SDXL). The fake score never uses CFG."
        },
    )
    guidance_jitter: float = field(
        default=0.0,
        metadata={"help": "δ >= 0: each batch uses w + U(−δ, δ) when CFG is on (paper text-to-image: 0.5)."},
    )
    real_scale0: float = field(
        default=0.75,
        metadata={
            "help": "DynaDG λ_r0: the real score uses LoRA scale λ_r(s) = λ_r0·c(s), annealed to 0 (the "
            "teacher) over dynamic_horizon (paper: 0.75 class-conditional, 0.5 text-to-image)."
        },
    )
    dynamic_horizon: int = field(
        default=10_000,
        metadata={
            "help": "S, generator steps over which DynaDG and DynaRS anneal, c(s) = ½(1 + cos(π·min(s/S, 1))); "
            "0 turns both off (λ_r = 0, uniform times). Paper: 10k for SiT, 2000 for SD3."
        },
    )
    dynars_a: float = field(
        default=4.0,
        metadata={
            "help": "DynaRS: renoise times τ ~ Beta(1 + (a − 1)·c(s), 1 + (b − 1)·c(s)); a at s = 0 (paper 4)."
        },
    )
    dynars_b: float = field(default=1.5, metadata={"help": "DynaRS b at s = 0 (paper 1.5)."})
    renoise: Literal["beta", "uniform"] = field(
        default="beta",
        metadata={
            "help": "Law of the critic's and the DMD renoise times: 'beta' = DynaRS (uniform once s >= S); "
            "'uniform' = U[renoise_t_min, 1) at every step (paper stage 2 and SDXL)."
        },
    )
    renoise_t_min: float = field(
        default=0.001,
        metadata={"help": "Lower end of the 'uniform' renoise law (paper code: 0.001); unused by 'beta'."},
    )
    ratio_update: int = field(
        default=5, metadata={"help": "R: critic updates per generator update (two-time-scale rule; paper 5)."}
    )
    cold_start_steps: int = field(
        default=0,
        metadata={
            "help": "Generator steps of stage 1 (DMD only) before the rewards turn on and the stage-2 learning "
            "rates apply; must be <= train.max_steps. 0 = rewards from the start. Paper SiT: 20000 "
            "(then +2000 steps of stage 2)."
        },
    )
    dmd_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of L_DMD in the generator loss; 0 = the reward-only RL baseline (needs a reward "
            "and cold_start_steps = 0)."
        },
    )
    eps: float = field(
        default=1e-8,
        metadata={
            "help": "Added to the per-sample normaliser mean|x0 − x̂0_real| of the DMD direction (paper 1e-8)."
        },
    )
    decoupled: bool = field(
        default=False,
        metadata={
            "help": "Decoupled DMD: split the real-score term into a CFG-augmentation part (w − 1)·(v_cond − "
            "v_uncond) and a distribution-matching part (v_cond − v_fake), each with its own renoise time."
        },
    )
    ca_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the CFG-augmentation term when decoupled = true (the DM term has dmd_weight)."
        },
    )
    ca_renoise: Literal["independent", "shared", "above_input"] = field(
        default="independent",
        metadata={
            "help": "Renoise time of the CFG-augmentation term when decoupled = true: 'independent' = its own "
            "draw from the DMD renoise law (and its own noise); 'shared' = the DM term's sample (an "
            "ablation: one guidance part fewer); 'above_input' = U(t_k, 1), above the noise level the "
            "student started its step from (needs student.num_steps > 1)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "guidance_jitter", ge=0)
        check_range(self, "real_scale0", ge=0)
        check_range(self, "dynamic_horizon", ge=0)
        check_range(self, "dynars_a", gt=0)
        check_range(self, "dynars_b", gt=0)
        check_range(self, "renoise_t_min", ge=0, lt=1)
        check_range(self, "ratio_update", ge=1)
        check_range(self, "cold_start_steps", ge=0)
        check_range(self, "dmd_weight", ge=0)
        check_range(self, "eps", ge=0)
        check_range(self, "ca_weight", ge=0)

    @property
    def cfg_enabled(self) -> bool:
        """True iff the real score uses CFG (w > 1), i.e. the unconditional pass is needed."""
        return self.guidance > 1.0

    def dynars(self) -> DynaRS:
        """The renoise-time schedule (:class:`dmdr_fast.algo.DynaRS`)."""
        from dmdr_fast.algo import DynaRS

        return DynaRS(
            horizon=self.dynamic_horizon,
            a=self.dynars_a,
            b=self.dynars_b,
            mode=self.renoise,
            t_min=self.renoise_t_min,
        )

    def dynadg(self) -> DynaDG:
        """The real-score LoRA-scale schedule (:class:`dmdr_fast.algo.DynaDG`)."""
        from dmdr_fast.algo import DynaDG

        return DynaDG(scale0=self.real_scale0, horizon=self.dynamic_horizon)

    def guidance_scale(self) -> GuidanceScale:
        """The real score's CFG scale with jitter (:class:`dmdr_fast.algo.GuidanceScale`)."""
        from dmdr_fast.algo import GuidanceScale

        return GuidanceScale(scale=self.guidance, jitter=self.guidance_jitter)


@dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """The two AdamW optimisers: generator (every R-th iteration) and critic (every iteration)."""

    lr_generator: float = field(
        default=2e-5,
        metadata={"help": "Generator learning rate, constant (paper SiT stage 1: 2e-5; SD3.5-L LoRA: 1e-6)."},
    )
    lr_critic: float = field(
        default=2e-4,
        metadata={
            "help": "Critic learning rate, constant. The critic must keep up with the student: DESIGN §1's "
            "toy runs needed ~10× the generator's LR for a LoRA critic (paper SiT used 2e-5 for both)."
        },
    )
    lr_generator_stage2: float | None = field(
        default=None,
        metadata={
            "help": "Generator LR from dmdr.cold_start_steps on (stage 2); null = keep lr_generator (paper SiT: 1e-5)."
        },
    )
    lr_critic_stage2: float | None = field(
        default=None,
        metadata={
            "help": "Critic LR from dmdr.cold_start_steps on (stage 2); null = keep lr_critic (paper SiT: 1e-5)."
        },
    )
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata={"help": "AdamW (β1, β2) for both optimisers."}
    )
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW ε for both optimisers."})
    weight_decay_generator: float = field(
        default=0.01, metadata={"help": "AdamW weight decay of the generator (paper 0.01)."}
    )
    weight_decay_critic: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of the critic (paper 0)."}
    )
    grad_clip: float = field(
        default=1.0,
        metadata={
            "help": "Max global grad norm, applied to each network's gradients; 0 = no clipping (paper 1.0)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lr_generator", "lr_critic"):
            check_range(self, name, gt=0)
        for name in ("lr_generator_stage2", "lr_critic_stage2"):
            require(self, name, getattr(self, name) is None or getattr(self, name) > 0, "> 0 or null")
        require(self, "betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        check_range(self, "adam_eps", gt=0)
        check_range(self, "weight_decay_generator", ge=0)
        check_range(self, "weight_decay_critic", ge=0)
        check_range(self, "grad_clip", ge=0)

    def learning_rates(self, stage2: bool) -> tuple[float, float]:
        """``(generator LR, critic LR)`` for stage 1 or stage 2."""
        if not stage2:
            return self.lr_generator, self.lr_critic
        gen = self.lr_generator if self.lr_generator_stage2 is None else self.lr_generator_stage2
        critic = self.lr_critic if self.lr_critic_stage2 is None else self.lr_critic_stage2
        return gen, critic


@dataclass(frozen=True)
class RewardConfig(ConfigBase):
    """One frozen, differentiable reward on decoded samples, applied from stage 2 on."""

    kind: Literal["none", "classifier", "clip", "pickscore", "hps", "image_reward", "aesthetic"] = field(
        default="classifier",
        metadata={
            "help": "'classifier': a frozen classifier, r = log p(c | decode(x0)) (ReFL; paper SiT: DINOv2-L "
            "linear head); 'clip' / 'pickscore' / 'hps' / 'image_reward' / 'aesthetic': text-image reward "
            "models loaded from `path` (dmdr_fast.rewards.build_reward); 'none': a disabled entry (its "
            "weight must be 0)."
        },
    )
    weight: float = field(
        default=0.05,
        metadata={
            "help": "λ_R of combine='fixed': the generator's gradient on x0 is g_DMD + weight·∇ℓ_R, i.e. the "
            "loss L_DMD + weight·ℓ_R (paper: 0.05 for the SiT classifier CE; 0.1–0.3 for CLIP/HPS). Pick it "
            "so that ℓ_R ≈ L_DMD at the start of stage 2 (author's advice). 0 disables the reward."
        },
    )
    combine: Literal["fixed", "balanced"] = field(
        default="fixed",
        metadata={
            "help": "How the reward gradient joins the DMD gradient on x0 (dmdr_fast.ops.reward_grad_combine): "
            "'fixed' = g_DMD + weight·g_R (the paper); 'balanced' = per sample g_DMD + w_i·g_R with "
            "w_i = min(max_weight, ratio·|g_DMD,i| / |g_R,i|): the reward pushes each sample `ratio` times "
            "as hard as distribution matching, whatever the reward's scale."
        },
    )
    ratio: float = field(
        default=1.0,
        metadata={"help": "combine='balanced': reward-to-DMD gradient-norm ratio per sample (e.g. 0.5)."},
    )
    max_weight: float | None = field(
        default=None,
        metadata={
            "help": "combine='balanced': cap on the per-sample weight w_i (null = no cap); guards samples whose "
            "reward gradient is nearly zero."
        },
    )
    prompt_prefix: str = field(
        default="",
        metadata={
            "help": "Text put before every prompt this reward scores (paper: 'Realistic photo ' for HPS); "
            "ignored for class labels."
        },
    )
    form: Literal["neg", "hinge"] = field(
        default="neg",
        metadata={
            "help": "Loss from the reward r: 'neg' = −r (for the classifier: cross-entropy); 'hinge' = "
            "relu(margin − r) (paper text-to-image scripts, for cosine scores)."
        },
    )
    margin: float = field(
        default=0.7, metadata={"help": "Margin of the 'hinge' form (paper: 0.7); unused by 'neg'."}
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the reward model (file or folder); null = the trainer or preset supplies the "
            "model (the digits preset trains its classifier)."
        },
    )
    name: str | None = field(
        default=None,
        metadata={
            "help": "Label in logs; null = the kind (a numeric suffix is added by the trainer if needed)."
        },
    )
    kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Extra arguments for the reward's builder. Plain YAML data only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "weight", ge=0)
        if self.kind == "none" and self.weight > 0:
            raise ConfigError(
                f"a reward of kind 'none' must have weight 0, got {self.weight}; choose a kind (e.g. "
                "'classifier') or remove the entry",
                field="weight",
                owner=type(self).__name__,
            )
        require(self, "name", self.name is None or bool(self.name.strip()), "a non-empty string or null")
        check_range(self, "ratio", ge=0)
        if self.max_weight is not None:
            check_range(self, "max_weight", ge=0)

    @property
    def active(self) -> bool:
        """True iff this reward contributes to the loss: a kind other than 'none' and a positive
        ``weight`` (``combine='fixed'``) or ``ratio`` (``'balanced'``)."""
        if self.kind == "none":
            return False
        return self.weight > 0 if self.combine == "fixed" else self.ratio > 0


@dataclass(frozen=True)
class MonitorConfig(ConfigBase):
    """The reward-hacking monitor (:class:`dmdr_fast.train.monitor.RewardHackingMonitor`).

    Every ``every`` generator steps it samples the student on fixed noise for fixed held-out
    conditions and records the training reward, a held-out score (a model the student is not
    trained on) and sample diversity. While the reward is being optimised (stage 2), an evaluation
    is *suspicious* when the training reward rose by more than ``reward_tol`` while the held-out
    score fell by more than ``heldout_tol`` or diversity fell by more than ``diversity_tol``
    (relative) since the previous one; ``patience`` suspicious evaluations in a row raise a warning.
    """

    every: int = field(
        default=0,
        metadata={
            "help": "Generator steps between monitor evaluations; 0 = off (the preset or the caller must "
            "supply the monitor's held-out conditions and score)."
        },
    )
    samples_per_condition: int = field(
        default=8, metadata={"help": "Samples per held-out condition (diversity is measured among them)."}
    )
    patience: int = field(
        default=3, metadata={"help": "Suspicious evaluations in a row before the monitor warns."}
    )
    reward_tol: float = field(
        default=0.0, metadata={"help": "Minimum rise of the training reward that counts as a rise."}
    )
    heldout_tol: float = field(
        default=0.0, metadata={"help": "Minimum fall of the held-out score that counts as a fall."}
    )
    diversity_tol: float = field(
        default=0.01,
        metadata={"help": "Minimum relative fall of diversity that counts as a fall (0.01 = 1 %)."},
    )
    seed: int = field(default=2024, metadata={"help": "Seed of the monitor's fixed noise."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "every", ge=0)
        check_range(self, "samples_per_condition", ge=2)
        check_range(self, "patience", ge=1)
        for name in ("reward_tol", "heldout_tol", "diversity_tol"):
            check_range(self, name, ge=0)


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """The run: length, batch, seed, numerics, device, and the logging/eval/checkpoint cadence."""

    max_steps: int = field(
        default=20_000,
        metadata={
            "help": "Generator updates to train (each takes dmdr.ratio_update critic updates). Paper SiT: 20k."
        },
    )
    batch_size: int = field(
        default=64,
        metadata={
            "help": "Batch size per process (global = batch_size × world size). Paper SiT stage 1: 64 per GPU."
        },
    )
    seed: int = field(default=30, metadata={"help": "Base seed; process i uses seed + i (paper: 30)."})
    precision: Literal["fp32", "bf16"] = field(
        default="fp32",
        metadata={
            "help": "'bf16' runs trainable paths under bf16 autocast (fp32 master weights); 'fp32' = none."
        },
    )
    deterministic: bool = field(
        default=False,
        metadata={
            "help": "Use deterministic algorithms (torch.use_deterministic_algorithms); slower on GPU."
        },
    )
    log_every: int = field(
        default=10,
        metadata={"help": "Log scalars (JSONL + TensorBoard) every this many generator steps; 0 = never."},
    )
    sample_every: int = field(
        default=500, metadata={"help": "Write a PNG grid of samples every this many steps; 0 = never."}
    )
    eval_every: int = field(
        default=1000, metadata={"help": "Evaluate metrics every this many steps; 0 = only at the end."}
    )
    checkpoint_every: int = field(
        default=1000, metadata={"help": "Write a checkpoint every this many steps; 0 = only at the end."}
    )
    keep_checkpoints: int = field(
        default=3, metadata={"help": "Keep the latest this many checkpoints; 0 = keep all."}
    )
    num_eval_samples: int = field(default=1000, metadata={"help": "Samples generated for each evaluation."})
    num_grid_samples: int = field(default=64, metadata={"help": "Samples in each PNG grid."})
    tensorboard: bool = field(
        default=True, metadata={"help": "Also write TensorBoard event files (JSONL is always written)."}
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:<index>'."},
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the networks (teacher/guidance, student, full critic) in place: state-dict "
            "names, checkpoints and exports are unchanged; the first steps pay the compilation."
        },
    )
    compile_backend: str = field(
        default="inductor",
        metadata={
            "help": "torch.compile backend with compile = true: 'inductor' (generated kernels), or 'aot_eager' / "
            "'eager' to debug graph capture without code generation."
        },
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = field(
        default="default",
        metadata={
            "help": "Inductor mode: 'default', or 'max-autotune-no-cudagraphs' (autotuned GEMM/conv kernels: "
            "slower to compile). CUDA-graph modes are not offered (training loop with LoRA scale inputs)."
        },
    )
    attention: str = field(
        default="sdpa",
        metadata={
            "help": "Attention of all networks, through dmdr_fast.ops.attention: a backend name ('sdpa', "
            "'triton', 'xformers', 'torch' = the fp32 reference), 'auto' (the dispatcher chooses) or "
            "'native' (the models' own diffusers attention, untouched)."
        },
    )
    kernel_backend: str | None = field(
        default=None,
        metadata={
            "help": "Backend of the fused ops ('torch', 'cpp', 'cuda', 'triton'); null = automatic "
            "(or the DMDR_FAST_BACKEND environment variable)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_steps", ge=1)
        check_range(self, "batch_size", ge=1)
        check_range(self, "seed", ge=0)
        for name in ("log_every", "sample_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            check_range(self, name, ge=0)
        check_range(self, "num_eval_samples", ge=1)
        check_range(self, "num_grid_samples", ge=1)
        require(self, "device", bool(_DEVICE.match(self.device)), "'auto', 'cpu', 'cuda' or 'cuda:<index>'")
        require(self, "attention", bool(_IDENTIFIER.match(self.attention)), "a backend name such as 'sdpa'")
        require(
            self,
            "compile_backend",
            bool(_IDENTIFIER.match(self.compile_backend)),
            "a backend name such as 'inductor'",
        )
        require(
            self,
            "kernel_backend",
            self.kernel_backend is None or bool(_IDENTIFIER.match(self.kernel_backend)),
            "a backend name such as 'torch' or null",
        )


@dataclass(frozen=True)
class DMDRTrainerConfig(ConfigBase):
    """Everything a DMDR run needs; saved with every run and checkpoint."""

    name: str = field(default="dmdr", metadata={"help": "Run name (used in logs and report titles)."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The teacher model."})
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "Prompts and the prompt-embedding cache."}
    )
    student: StudentConfig = field(
        default_factory=StudentConfig, metadata={"help": "The few-step generator G."}
    )
    critic: CriticConfig = field(
        default_factory=CriticConfig, metadata={"help": "The guidance network's critic ψ."}
    )
    dmdr: DMDRConfig = field(
        default_factory=DMDRConfig, metadata={"help": "The DMDR method's hyper-parameters."}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimisers and clipping."})
    rewards: tuple[RewardConfig, ...] = field(
        default=(),
        metadata={
            "help": "Rewards added to the generator loss from stage 2 on (dmdr.cold_start_steps); empty = "
            "pure DMD. Add one from the CLI with --set rewards.0.kind=classifier."
        },
    )
    monitor: MonitorConfig = field(
        default_factory=MonitorConfig, metadata={"help": "The reward-hacking monitor."}
    )
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata={"help": "Run length, cadence and numerics."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "name", bool(self.name.strip()), "a non-empty string")
        self._check_cross_fields()

    def _fail(self, key: str, reason: str) -> None:
        raise ConfigError(reason, field=key, owner=type(self).__name__)

    def _check_cross_fields(self) -> None:
        dmdr, train = self.dmdr, self.train
        if dmdr.cold_start_steps > train.max_steps:
            self._fail(
                "dmdr.cold_start_steps",
                f"stage 1 ({dmdr.cold_start_steps} steps) must fit in train.max_steps ({train.max_steps})",
            )
        if dmdr.dmd_weight == 0:
            if not self.active_rewards:
                self._fail(
                    "dmdr.dmd_weight",
                    "is 0 and no reward is active: the generator would have no loss; add a reward "
                    "(rewards.0.kind=classifier) or set dmd_weight > 0",
                )
            if dmdr.cold_start_steps > 0:
                self._fail(
                    "dmdr.dmd_weight",
                    f"is 0 but dmdr.cold_start_steps = {dmdr.cold_start_steps}: stage 1 (DMD only) would "
                    "train nothing; set cold_start_steps = 0 for the reward-only baseline",
                )
        if self.critic.kind == "lora" and dmdr.real_scale0 > self.critic.fake_scale:
            self._fail(
                "dmdr.real_scale0",
                f"({dmdr.real_scale0}) must not exceed critic.fake_scale ({self.critic.fake_scale}): the "
                "DynaDG target lies between the teacher (scale 0) and the fake score",
            )
        if self.model.weights_dtype == "fp16" and train.precision == "bf16":
            self._fail(
                "model.weights_dtype",
                "is fp16 while train.precision is bf16: bf16 autocast over fp16 weights mixes two "
                "half-precision types in one op (torch refuses); use weights_dtype bf16 (or fp32)",
            )
        if dmdr.decoupled and dmdr.dmd_weight == 0:
            self._fail("dmdr.decoupled", "needs dmdr.dmd_weight > 0 (it splits the DMD term)")
        if dmdr.decoupled and not dmdr.cfg_enabled:
            self._fail(
                "dmdr.decoupled",
                f"splits off the CFG term (w − 1)·(v_cond − v_uncond), which is zero with dmdr.guidance = "
                f"{dmdr.guidance} (<= 1, no CFG): set guidance > 1 or decoupled = false",
            )
        if dmdr.decoupled and dmdr.ca_renoise == "above_input" and self.student.num_steps == 1:
            self._fail(
                "dmdr.ca_renoise",
                "'above_input' draws τ from (t_k, 1), which is empty for a 1-step student (t_0 = 1); "
                "use 'independent'",
            )
        if self.student.noise_timestep is not None and self.model.family != "sdxl":
            self._fail(
                "student.noise_timestep",
                f"is for SDXL students (DMD2's conditioning timestep); model.family {self.model.family!r} "
                "starts from pure noise at t = 1 with its own time input: leave it null",
            )
        for i, r in enumerate(self.rewards):
            if r.active and r.combine == "balanced" and dmdr.dmd_weight == 0:
                self._fail(
                    f"rewards.{i}.combine",
                    "'balanced' scales the reward gradient to the DMD gradient, which is zero with "
                    "dmdr.dmd_weight = 0; use combine='fixed' for the reward-only baseline",
                )
        names = [r.name for r in self.rewards if r.name is not None]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            self._fail("rewards", f"reward names must be unique, got duplicates {duplicates}")

    @property
    def active_rewards(self) -> tuple[RewardConfig, ...]:
        """The rewards that contribute to the loss (see :attr:`RewardConfig.active`)."""
        return tuple(r for r in self.rewards if r.active)

    def stage(self, step: int) -> int:
        """1 before ``dmdr.cold_start_steps`` generator updates, 2 from then on."""
        return 1 if step < self.dmdr.cold_start_steps else 2
