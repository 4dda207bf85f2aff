"""The method of a run: DMDR's hyper-parameters, the two optimisers, the rewards and the monitor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dmdr_fast.algo.guidance import uses_cfg
from dmdr_fast.config.base import ConfigBase
from dmdr_fast.config.engine import ConfigError, check_range, require

__all__ = ["DMDRConfig", "MonitorConfig", "OptimConfig", "RewardConfig"]


@dataclass(frozen=True)
class DMDRConfig(ConfigBase):
    """The method (docs/method.md): real-score guidance, DynaDG/DynaRS, two time scales, stages, weights."""

    guidance: float = field(
        default=1.0,
        metadata={
            "help": "CFG scale w of the real score, v_real = v_uncond + w·(v_cond − v_uncond); w = 1 (or 0) = no "
            "CFG, other values below 1 are refused (paper: none for SiT, 4.0 for SD3.5-L, 7.0 for SD3-M/SDXL). The fake score never uses CFG."
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
            "0 turns both off (λ_r = 0, uniform times; dynars / dynadg turn off one). Paper: 10k for SiT, "
            "2000 for SD3."
        },
    )
    dynars_a: float = field(
        default=4.0,
        metadata={
            "help": "DynaRS: renoise times τ ~ Beta(1 + (a − 1)·c(s), 1 + (b − 1)·c(s)); a at s = 0 (paper 4)."
        },
    )
    dynars_b: float = field(default=1.5, metadata={"help": "DynaRS b at s = 0 (paper 1.5)."})
    dynars: bool = field(
        default=True,
        metadata={
            "help": "DynaRS on: the 'beta' renoise law anneals from Beta(dynars_a, dynars_b) over "
            "dynamic_horizon. false = U(0, 1) from the first step (the same draws as dynars_a = dynars_b "
            "= 1), DynaDG untouched. No effect with renoise: uniform."
        },
    )
    dynadg: bool = field(
        default=True,
        metadata={
            "help": "DynaDG on: the real score's LoRA scale anneals from real_scale0 over dynamic_horizon. "
            "false = the teacher (scale 0) from the first step (as real_scale0 = 0), DynaRS untouched."
        },
    )
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
        # No CFG is 1 (or 0, the SiT scripts' "off"); anything else below 1 is a typo, not "off".
        require(
            self,
            "guidance",
            self.guidance == 0 or self.guidance >= 1,
            ">= 1 (CFG scale), or 1 or 0 for no CFG",
        )
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
        """True iff the real score uses CFG, i.e. the unconditional pass is needed (:func:`uses_cfg`)."""
        return uses_cfg(self.guidance)


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
            "help": "Critic learning rate, constant. The critic must keep up with the student: our digits runs "
            "(docs/method.md §5.2) needed ~10× the generator's LR for a LoRA critic (paper SiT used 2e-5 for both)."
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

    kind: Literal[
        "none",
        "classifier",
        "clip",
        "pickscore",
        "hps",
        "image_reward",
        "aesthetic",
        "jpeg",
        "ink",
        "callable",
    ] = field(
        default="classifier",
        metadata={
            "help": "'classifier': a frozen classifier, r = log p(c | decode(x0)) (ReFL; paper SiT: DINOv2-L "
            "linear head); 'clip' / 'pickscore' / 'hps' / 'image_reward' / 'aesthetic': text-image reward "
            "models loaded from `path` (dmdr_fast.rewards.build_reward); 'jpeg' (kwargs.direction: "
            "compressibility | incompressibility) and 'ink' (fraction of bright pixels): scores without "
            "gradients for rl.algorithm; 'callable': kwargs.fn = 'module:function' returning (B,) scores; "
            "'none': a disabled entry (its weight must be 0)."
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
    score fell by more than ``heldout_tol``, diversity fell by more than ``diversity_tol``
    (relative) or the DMD loss rose by more than ``dmd_tol`` (relative) since the previous one; ``patience`` suspicious evaluations in a row raise a warning.
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
    dmd_tol: float = field(
        default=0.5,
        metadata={
            "help": "Minimum relative rise of the mean DMD loss between evaluations that counts as drift "
            "(0.5 = +50 %; the per-step loss is noisy)."
        },
    )
    seed: int = field(default=2024, metadata={"help": "Seed of the monitor's fixed noise."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "every", ge=0)
        check_range(self, "samples_per_condition", ge=2)
        check_range(self, "patience", ge=1)
        for name in ("reward_tol", "heldout_tol", "diversity_tol", "dmd_tol"):
            check_range(self, name, ge=0)
