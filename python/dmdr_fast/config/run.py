"""The run (length, cadence, numerics, device) and the root config, with the cross-field checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from dmdr_fast.config.base import ConfigBase
from dmdr_fast.config.engine import NAME_PATTERN, ConfigError, check_range, require
from dmdr_fast.config.method import DMDRConfig, MonitorConfig, OptimConfig, RewardConfig
from dmdr_fast.config.networks import CriticConfig, DataConfig, ModelConfig, StudentConfig
from dmdr_fast.config.rl import RLConfig

__all__ = ["DMDRTrainerConfig", "TrainConfig"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "Micro-batches of batch_size per optimiser step (each optimiser, critic and generator, "
            "steps on the mean gradient of its own micro-batches); global batch = batch_size × grad_accum × world."
        },
    )
    parallel: Literal["ddp", "fsdp"] = field(
        default="ddp",
        metadata={
            "help": "Under torchrun: 'ddp' (a full copy of every network per process; LoRA students) or 'fsdp' "
            "(FSDP2: student, critic, EMA and frozen teacher sharded per block; sharded checkpoints)."
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
        check_range(self, "grad_accum", ge=1)
        check_range(self, "seed", ge=0)
        for name in ("log_every", "sample_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            check_range(self, name, ge=0)
        check_range(self, "num_eval_samples", ge=1)
        check_range(self, "num_grid_samples", ge=1)
        require(self, "device", bool(_DEVICE.match(self.device)), "'auto', 'cpu', 'cuda' or 'cuda:<index>'")
        require(self, "attention", bool(NAME_PATTERN.match(self.attention)), "a backend name such as 'sdpa'")
        require(
            self,
            "compile_backend",
            bool(NAME_PATTERN.match(self.compile_backend)),
            "a backend name such as 'inductor'",
        )
        require(
            self,
            "kernel_backend",
            self.kernel_backend is None or bool(NAME_PATTERN.match(self.kernel_backend)),
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
    rl: RLConfig = field(
        default_factory=RLConfig,
        metadata={"help": "Rewards without gradients: GRPO or advantage-weighted Decoupled DMD."},
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
        self._check_rl()
        names = [r.name for r in self.rewards if r.name is not None]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            self._fail("rewards", f"reward names must be unique, got duplicates {duplicates}")

    def _check_rl(self) -> None:
        rl, dmdr = self.rl, self.dmdr
        if not rl.enabled:
            return
        if not self.active_rewards:
            self._fail("rl.algorithm", f"{rl.algorithm!r} needs an active reward (rewards.0.kind=...)")
        if rl.group_size < 2:
            self._fail("rl.group_size", "must be >= 2: a group of one has no relative advantage")
        if self.train.grad_accum > 1:
            self._fail(
                "train.grad_accum",
                "micro-batches are not supported with rl.algorithm yet (a group must be scored in one "
                "batch): use grad_accum = 1 and a batch of whole groups",
            )
        if rl.algorithm == "advantage_weighted" and not dmdr.decoupled:
            self._fail(
                "rl.algorithm",
                "'advantage_weighted' weights Decoupled DMD's CA term: set dmdr.decoupled = true (and "
                "dmdr.guidance > 1), or use rl.algorithm = grpo",
            )
        if rl.algorithm == "grpo" and rl.regularizer in ("dmd", "dm") and dmdr.dmd_weight == 0:
            self._fail(
                "rl.regularizer",
                f"{rl.regularizer!r} is the DMD loss, which dmdr.dmd_weight = 0 turns off; set "
                "rl.regularizer = none for the unregularised baseline",
            )

    @property
    def active_rewards(self) -> tuple[RewardConfig, ...]:
        """The rewards that contribute to the loss (see :attr:`RewardConfig.active`)."""
        return tuple(r for r in self.rewards if r.active)

    def stage(self, step: int) -> int:
        """1 before ``dmdr.cold_start_steps`` generator updates, 2 from then on."""
        return 1 if step < self.dmdr.cold_start_steps else 2

    @property
    def method_name(self) -> str:
        """What the run trains, for reports and table rows: ``"DMD only"`` (no active reward),
        ``"reward only"`` (``dmdr.dmd_weight = 0``), ``"DMDR"`` (DMD + differentiated rewards), or
        the reward-without-gradients mode (``"GRPO + DMD"``, ``"GRPO + KL"``, ``"GRPO, no
        regulariser"``, ``"advantage-weighted DDMD"``)."""
        if not self.active_rewards:
            return "DMD only"
        if self.rl.algorithm == "grpo":
            reg = self.rl.regularizer
            return "GRPO, no regulariser" if reg == "none" else f"GRPO + {reg.upper()}"
        if self.rl.algorithm == "advantage_weighted":
            return "advantage-weighted DDMD"
        return "reward only" if self.dmdr.dmd_weight == 0 else "DMDR"

    def training_summary(self) -> str:
        """One sentence on what ran for how long, e.g. ``"DMDR: 400 generator steps of DMD only,
        then 200 of DMD + reward (classifier)"`` or ``"DMD only (no reward): 600 generator steps, at
        stage 2's learning rates from step 400"``."""
        total, cold = self.train.max_steps, self.dmdr.cold_start_steps
        name = self.method_name
        rewards = ", ".join(r.name or r.kind for r in self.active_rewards)
        if name == "DMD only":
            lrs = self.optim.learning_rates(False) != self.optim.learning_rates(True)
            later = f", at stage 2's learning rates from step {cold}" if 0 < cold < total and lrs else ""
            return f"DMD only (no reward): {total} generator steps{later}"
        if name == "reward only":
            return f"reward only (no DMD term): {total} generator steps of the reward ({rewards})"
        what = "DMD + reward" if name == "DMDR" else name
        if cold == 0:
            return f"{name}: {total} generator steps of {what} ({rewards}) from the start"
        return f"{name}: {cold} generator steps of DMD only, then {total - cold} of {what} ({rewards})"
