"""The DMDR Trainer: docs/method.md §5 as one readable loop over two optimisers on two time scales.

One *iteration* (``Trainer.step``):

1. backward simulation of the student G (no grad) → the generator input ``x_in`` at ``t_k`` and
   the rollout's clean estimate ``x̂0_sel``;
2. a critic update: flow matching of the fake score ``H(·; λ_f)`` on ``x̂0_sel`` at DynaRS times;
3. every ``dmdr.ratio_update``-th iteration, a generator update: ``x0 = x_in − t_k·G(x_in)``, one
   batched guidance forward for (fake, cond, uncond), the fused DMD loss, plus the rewards from
   stage 2 on (``s >= dmdr.cold_start_steps``). With ``dmdr.decoupled`` (Decoupled DMD) the real
   score's CFG-augmentation part is evaluated at its own renoised sample: the one guidance forward
   then holds (fake, cond) at τ and (cond, uncond) at τ_ca.

The method's math lives in :mod:`dmdr_fast.algo` (the generator step's functions in
:mod:`dmdr_fast.algo.generator`); the Trainer keeps state and order: the networks and their
optimisers, the EMA, DDP, the stages, checkpoints and logging.

``s`` (``state.gen_step``) counts generator updates; every schedule and every ``*_every`` cadence
is keyed on it. All randomness comes from one ``torch.Generator`` that is checkpointed, so a run
resumed from a checkpoint continues exactly as if it had not stopped (on CPU, deterministic ops).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dmdr_fast._device import host_to_device
from dmdr_fast._errors import UserError
from dmdr_fast.algo import (
    backward_simulation,
    critic_loss,
    few_step_sample,
    few_step_timesteps,
    noise_like,
    randn,
    renoise,
)
from dmdr_fast.algo.generator import (
    DMDInputs,
    ScoreNetworks,
    add_reward_gradients,
    dmd_direction,
    dmd_inputs,
    reward_groups,
)
from dmdr_fast.algo.sampling import BackwardSimulation
from dmdr_fast.conditions import Cond, index_cond, to_device
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.data.prompts import PromptBatch
from dmdr_fast.data.samplers import ClassLabelSampler, ConditionSampler
from dmdr_fast.models.lora import lora_scale
from dmdr_fast.models.protocol import FlowModelAdapter
from dmdr_fast.models.roles import make_guidance, make_student
from dmdr_fast.train import trainer_io
from dmdr_fast.train.components import (
    frozen_fp8,
    guidance_scale,
    load_student_init,
    lora_config,
    real_score_schedule,
    renoise_schedule,
    reward_policies,
    use_attention,
)
from dmdr_fast.train.interrupt import stop_requested
from dmdr_fast.train.logging import RunLogger, write_sample_grid
from dmdr_fast.train.monitor import RewardHackingMonitor
from dmdr_fast.train.parallel import (
    balanced,
    broadcast_from_rank0,
    collective_forwards,
    shard_network,
    wrap_ddp,
)
from dmdr_fast.train.rl import GroupRL
from dmdr_fast.train.runtime import (
    TrainerState,
    compile_networks,
    deterministic_algorithms,
    deterministic_scope,
    ema_update,
    grad_norm,
    mean_metrics,
    resolve_device,
    swapped_weights,
    trainable,
)

if TYPE_CHECKING:
    from dmdr_fast.models.sdxl import SDXLAdapter
    from dmdr_fast.rewards import CompositeReward

__all__ = [
    "ClassLabelSampler",
    "ConditionSampler",
    "Trainer",
    "TrainerState",
    "deterministic_algorithms",
    "resolve_device",
]


def _rollout_x0(sim: BackwardSimulation) -> torch.Tensor:
    assert sim.x0_sel is not None  # kept unless the simulation skipped the selected step
    return sim.x0_sel.float()


class Trainer:
    """Runs DMDR on any teacher that implements :class:`FlowModelAdapter`.

    Args:
        config: the run's configuration.
        teacher: the teacher adapter. With a LoRA critic it becomes the guidance network in place
            (at LoRA scale 0 it still is the teacher), so only two big networks exist.
        reward: a :class:`dmdr_fast.rewards.CompositeReward` (or None for pure DMD), applied from
            stage 2 on; it receives ``teacher.decode(x0)`` and the raw conditions.
        data: the condition sampler (e.g. :class:`ClassLabelSampler`).
        out_dir: where logs, samples and checkpoints go (None: nothing is written).
        evaluator: optional ``evaluator(trainer) -> dict`` called every ``train.eval_every``
            generator steps; its results are logged and kept in ``state.history``.
        monitor: optional :class:`~dmdr_fast.train.monitor.RewardHackingMonitor`, run every
            ``monitor.every`` generator steps; logs ``monitor/*`` and warns (log + progress bar)
            when the training reward rises while the held-out score or diversity falls.
        load_init: read ``student.init``; pass False when a checkpoint is about to replace the
            student anyway (a resume), so the init file need not exist any more.
    """

    def __init__(
        self,
        config: DMDRTrainerConfig,
        teacher: FlowModelAdapter,
        *,
        reward: CompositeReward | None = None,
        data: ConditionSampler,
        out_dir: str | os.PathLike[str] | None = None,
        evaluator: Callable[[Trainer], dict[str, float]] | None = None,
        monitor: RewardHackingMonitor | None = None,
        load_init: bool = True,
    ) -> None:
        if config.active_rewards and reward is None:
            raise ValueError("config.rewards has active rewards but no `reward` model was passed to Trainer")
        self.config = config
        self.device = resolve_device(config.train.device)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        torch.manual_seed(config.train.seed + self.rank)  # LoRA initialisation below
        # The whole adapter (VAE, text encoders of text-to-image families), not only the network.
        (teacher if isinstance(teacher, nn.Module) else teacher.network).to(self.device)
        self.reward = reward.to(self.device).eval() if reward is not None else None
        self.data = data
        self.evaluator = evaluator
        self.monitor = monitor
        if monitor is not None and not monitor.config_given:
            monitor.config = config.monitor
        if monitor is not None and isinstance(monitor.heldout, nn.Module):
            monitor.heldout.to(self.device).eval()
        # Running values, checkpointed: reward_cos/* and loss_dmd since the last monitor evaluation,
        # the critic's losses since the last generator step's log.
        self.reward_cosines: list[float] = []
        self.dmd_losses: list[float] = []
        self.out_dir = Path(out_dir) if out_dir is not None else None

        s, c = config.student, config.critic
        targets = getattr(teacher, "default_lora_targets", ())
        # FSDP: one tensor cannot be in two FSDP units, so a LoRA student gets its own frozen base.
        self.sharded = config.train.parallel == "fsdp" and torch.distributed.is_initialized()
        self.collective = collective_forwards(config.train.parallel, self.world)  # all ranks, every forward
        self.student = make_student(
            teacher,
            lora=lora_config(s.lora, "student", targets) if s.kind == "lora" else None,
            share_base=not self.sharded,
        )
        if s.kind == "full":
            self.student.network.float()  # fp32 master weights even when the teacher is bf16
        if s.init is not None and load_init:  # False when a checkpoint will replace it (resume)
            load_student_init(self.student, s.kind, s.init)
        if s.noise_timestep is not None:
            cast("SDXLAdapter", self.student).set_noise_timestep(s.noise_timestep)  # config: SDXL only
        if c.kind == "lora":
            self.guidance = make_guidance(teacher, lora_config(c.lora, "critic", targets))
            self.critic = None
        else:  # DMD2-style trainable full copy as the fake score; the teacher stays frozen
            teacher.network.requires_grad_(False)
            self.guidance = teacher
            self.critic = make_student(teacher)
            self.critic.network.float()
        use_attention(self._networks(), config.train.attention)  # then FP8 (its flag is on them)
        lora_student = self.student.network if s.kind == "lora" else None
        self.fp8 = frozen_fp8(config.model, self.guidance.network, lora_student)
        if self.sharded:  # same start on every rank, then each keeps 1/N (train/parallel.py)
            broadcast_from_rank0(self._networks())
            for net in self._networks():
                shard_network(net, config.train.precision, self.device)
        if config.train.compile:
            compile_networks(self._networks(), config.train)
        self.student_forward = self._wrap_ddp(self.student)
        critic_owner = self.critic if self.critic is not None else self.guidance
        self._critic_net = self._wrap_ddp(critic_owner)

        o = config.optim
        lr_g, lr_c = o.learning_rates(stage2=False)
        self.opt_g = torch.optim.AdamW(
            trainable(self.student.network),
            lr=lr_g,
            betas=o.betas,
            eps=o.adam_eps,
            weight_decay=o.weight_decay_generator,
        )
        self.opt_c = torch.optim.AdamW(
            trainable(critic_owner.network),
            lr=lr_c,
            betas=o.betas,
            eps=o.adam_eps,
            weight_decay=o.weight_decay_critic,
        )
        self.ema = (
            {n: p.detach().clone() for n, p in self.student.network.named_parameters() if p.requires_grad}
            if s.ema_decay > 0
            else None
        )
        self.grid = self._grid(s.num_steps)
        self.dynars = renoise_schedule(config.dmdr)
        self.dynadg = real_score_schedule(config.dmdr)
        self.cfg_scale = guidance_scale(config.dmdr)
        # How the generator step reaches the scores (algo.generator): the guidance network at a
        # LoRA scale, and the full critic if there is one; both under the run's autocast.
        self.scores = ScoreNetworks(
            guidance=self._guidance_velocity,
            fake_scale=c.fake_scale,
            critic=self._critic_velocity if self.critic is not None else None,
        )
        self.reward_policies = reward_policies(config, reward) if not config.rl.enabled else []
        self.rl = GroupRL(self) if config.rl.enabled else None  # rewards as black boxes (train/rl.py)
        # One RNG stream per micro-batch slot of the world batch (rank r, micro-batch i: slot
        # r·grad_accum + i): 1 process × 2 micro-batches draws what 2 processes × 1 draw.
        k = config.train.grad_accum
        self.gens = [torch.Generator().manual_seed(config.train.seed + self.rank * k + i) for i in range(k)]
        self.gen = self.gens[0]  # the current micro-batch's stream
        self.state = TrainerState()
        self.logger = RunLogger(
            self.out_dir if self.rank == 0 else None, tensorboard=config.train.tensorboard
        )
        if self.fp8 is not None:
            self.logger.note(self.fp8.summary())
        if config.train.parallel == "fsdp" and not self.sharded:
            self.logger.note("train.parallel=fsdp without torchrun: one process, nothing sharded")
        self._stage2_applied = False
        self.critic_losses: list[float | torch.Tensor] = []  # read out once per generator step

    # ------------------------------------------------------------------------------ helpers

    def _networks(self) -> list[nn.Module]:
        """The distinct big networks: teacher/guidance, student and (if any) the full critic."""
        networks = [self.guidance.network, self.student.network]
        if self.critic is not None:
            networks.append(self.critic.network)
        return list({id(n): n for n in networks}.values())

    def _wrap_ddp(self, adapter: FlowModelAdapter) -> Callable[..., torch.Tensor]:
        """The callable used for gradient-carrying forwards (DDP-wrapped under torchrun)."""
        if self.world > 1 and not self.sharded and isinstance(adapter, nn.Module):
            return wrap_ddp(adapter, self.device)
        return adapter.velocity

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast context (``train.precision``: bf16 on the device type, else none)."""
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grid(self, num_steps: int) -> torch.Tensor:
        """The student's ``(N + 1,)`` time grid: the adapter's own (text-to-image families: exactly
        what the exported diffusers scheduler visits) or the shifted uniform grid."""
        grid_fn = getattr(self.student, "few_step_grid", None)
        if grid_fn is not None:
            return grid_fn(num_steps, self.config.student.shift).to(self.device)
        return few_step_timesteps(num_steps, self.config.student.shift, device=self.device)

    def encode(self, raw: Any) -> tuple[Any, Any]:
        """``(what rewards see, the encoded condition batch on the device)`` for sampled conditions.

        A :class:`~dmdr_fast.data.prompts.PromptBatch` (from the prompt cache) carries its encoded
        condition, so no text encoder runs; anything else goes through ``encode_condition``.
        """
        if isinstance(raw, PromptBatch):
            return list(raw.prompts), to_device(raw.condition, self.device)
        cond = self.student.encode_condition(raw)
        raw = host_to_device(raw, self.device) if isinstance(raw, torch.Tensor) else raw
        return raw, to_device(cond, self.device)

    def draw_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise of ``shape`` on the device from the run's RNG."""
        return randn(shape, generator=self.gen, device=self.device)  # CPU draw, async copy

    @property
    def stage(self) -> int:
        """1 (DMD only, cold start) or 2 (DMD + rewards)."""
        return self.config.stage(self.state.gen_step)

    def apply_stage_learning_rates(self) -> None:
        """Set stage 2's learning rates once stage 2 is reached (no-op otherwise or when set)."""
        if self.stage == 2 and not self._stage2_applied:
            self._enter_stage2()

    def _enter_stage2(self) -> None:
        """Lower learning rates for stage 2, set explicitly (also after a resume: a restored optimiser
        state must not keep stage 1's rates, docs/method.md §9)."""
        lr_g, lr_c = self.config.optim.learning_rates(stage2=True)
        for opt, lr in ((self.opt_g, lr_g), (self.opt_c, lr_c)):
            for group in opt.param_groups:
                group["lr"] = lr
        self._stage2_applied = True

    def _guidance_velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Cond, scale: torch.Tensor | float | None
    ):
        """H(x, t, c; λ) for :class:`~dmdr_fast.algo.generator.ScoreNetworks` (``scale`` None: as it is)."""
        with self.autocast():
            if scale is None:
                return self.guidance.velocity(x, t, cond)
            with lora_scale(self.guidance.network, scale):
                return self.guidance.velocity(x, t, cond)

    def _critic_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The full critic's fake score (no DDP wrapper: a no-grad query)."""
        assert self.critic is not None
        with self.autocast():
            return self.critic.velocity(x, t, cond)

    # ------------------------------------------------------------------------------ one iteration

    @deterministic_scope
    def step(self) -> dict[str, float] | None:
        """One iteration; returns the generator step's metrics when a generator update happened.

        With ``train.grad_accum = k`` it runs k micro-batches of ``train.batch_size``, each from its
        own RNG stream, and each optimiser steps once on the mean of its k gradients.
        """
        cfg, st = self.config, self.state
        s, stage = st.gen_step, self.stage
        self.apply_stage_learning_rates()
        B, k = cfg.train.batch_size, cfg.train.grad_accum
        rl = self.rl if stage == 2 else None  # groups of K per condition, scored rewards (k = 1)
        gen_update = (st.step + 1) % cfg.dmdr.ratio_update == 0
        # In a generator-update iteration the generator's own forward x0 = x_in − t_k·G(x_in)
        # (with grad) equals the rollout's x̂0 at step k — G has not changed in between — so the
        # rollout skips that evaluation and the critic trains on x0.detach() (trajectory mode).
        # Not with micro-batches: all k student graphs would be held through the critic updates.
        reuse = gen_update and cfg.student.backward_sim == "trajectory" and k == 1
        t0, batches = time.perf_counter(), []
        # All gradients go first: else the last generator step's are held through the forwards below.
        self.opt_c.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        for i in range(k):
            self.gen = self.gens[i]
            raw, cond = rl.sample(self, B) if rl is not None else self.encode(self.data.sample(B, self.gen))
            if rl is not None and rl.grpo and gen_update:  # rollout, critic, scores, policy steps
                return rl.grpo_iteration(self, raw, cond, stage)
            # 1. Backward simulation (no grad).
            sim = self._backward_simulation(B, cond, skip_selected=reuse)
            # In trajectory mode the critic trains on the generator's own x0, so it comes first;
            # else it comes after the critic update (same value: the critic does not touch G), so
            # that the student's graph is not held in memory through the critic's forward/backward.
            x0 = self._generator_x0(sim, cond) if reuse else None
            # 2. Critic: flow matching of the fake score on the student's samples.
            self.critic_backward(x0.detach() if x0 is not None else _rollout_x0(sim), cond, s, 1 / k)
            batches.append((raw, cond, sim, x0))
        gn_c = self.critic_step()
        st.step += 1
        if not gen_update:
            return None

        # 3. Generator update: the scores at a renoised sg(x0), then ONE backward through G.
        parts = []
        for i, (raw, cond, sim, x0) in enumerate(batches):
            self.gen = self.gens[i]
            x0 = x0 if x0 is not None else self._generator_x0(sim, cond)
            null = self.student.null_condition(B) if self.cfg_scale.enabled else None
            inputs = dmd_inputs(
                self.scores, x0, sim.t_in, cond, null, step=s, renoise_times=self.dynars, cfg=self.cfg_scale,
                real_scale=self.dynadg.real_scale(s), decoupled=cfg.dmdr.decoupled,
                ca_renoise=cfg.dmdr.ca_renoise, generator=self.gen,
            )  # fmt: skip
            parts.append(self.generator_backward(x0, inputs, raw, stage, scale=1 / k))
        metrics = mean_metrics(parts)
        metrics["grad_norm_g"] = float(grad_norm(trainable(self.student.network), cfg.optim.grad_clip))
        self.opt_g.step()
        self.update_ema()
        st.gen_step += 1
        return self.finish_generator_step(metrics, stage, gn_c, inputs, s, t0)

    def finish_generator_step(
        self,
        metrics: dict[str, float],
        stage: int,
        gn_c: torch.Tensor,
        inputs: DMDInputs | None,
        s: int,
        t0: float,
    ) -> dict[str, float]:
        """The metrics every generator step logs (``inputs`` None: a step without DMD inputs)."""
        beta_a, beta_b = self.dynars.beta_params(s)
        metrics.update(
            step=self.state.gen_step,
            stage=stage,
            loss_critic=sum(float(v) for v in self.critic_losses) / len(self.critic_losses),
            grad_norm_c=float(gn_c),
            lambda_r=inputs.real_scale if inputs is not None else self.dynadg.real_scale(s),
            guidance=inputs.guidance if inputs is not None else 1.0,
            dynars_alpha=beta_a,
            dynars_beta=beta_b,
            lr_g=self.opt_g.param_groups[0]["lr"],
            iter_time=time.perf_counter() - t0,
        )
        self.critic_losses.clear()
        return metrics

    def _backward_simulation(self, B: int, cond: Cond, *, skip_selected: bool) -> BackwardSimulation:
        """The student's rollout from fresh noise over its grid (no grad), per ``student.backward_sim``.

        Its number of network calls depends on the drawn steps; under FSDP every call is a
        collective, so the ranks pad to the same count (:func:`~dmdr_fast.train.parallel.balanced`)."""
        noise = self.draw_noise((B, *self.student.sample_shape))
        mode, gen = self.config.student.backward_sim, self.gen
        with self.autocast():
            return balanced(
                lambda velocity: backward_simulation(
                    velocity, noise, cond, self.grid, mode=mode, generator=gen, skip_selected=skip_selected
                ),
                self.student.velocity, len(self.grid) - 1 if self.collective else None,
                lambda: (noise[:1], self.grid[:1], index_cond(cond, torch.zeros(1, dtype=torch.long))),
            )  # fmt: skip

    def _generator_x0(self, sim: BackwardSimulation, cond: Cond) -> torch.Tensor:
        """The generator's output ``x0 = x_in − t_k·G(x_in, t_k, c)`` with grad."""
        with self.autocast():
            v_g = self.student_forward(sim.x_in, sim.t_in, cond)
        return sim.x_in - sim.t_in.view(-1, *[1] * (sim.x_in.dim() - 1)) * v_g.float()

    def critic_update(self, x0_sel: torch.Tensor, cond: Cond, s: int) -> torch.Tensor:
        """One AdamW step of the critic on one batch (:meth:`critic_backward`, :meth:`critic_step`)."""
        self.opt_c.zero_grad(set_to_none=True)
        self.critic_backward(x0_sel, cond, s)
        return self.critic_step()

    def critic_backward(self, x0_sel: torch.Tensor, cond: Cond, s: int, scale: float = 1.0) -> None:
        """Accumulate ``scale ×`` the gradient of the critic's flow-matching loss at DynaRS times
        (the loss is kept for the next generator step's log)."""
        cfg = self.config
        tau = host_to_device(self.dynars.sample(x0_sel.shape[0], s, generator=self.gen), self.device)
        eps = noise_like(x0_sel, self.gen)
        # The backward runs inside the LoRA-scale context too: with gradient checkpointing the
        # blocks' forwards are recomputed during backward and must see the fake score's λ_f again.
        scale_ctx = (
            lora_scale(self.guidance.network, cfg.critic.fake_scale)
            if self.critic is None
            else contextlib.nullcontext()
        )
        with scale_ctx:
            with self.autocast():
                v = self._critic_net(renoise(x0_sel, tau, eps), tau, cond)
            loss_c = critic_loss(v.float(), x0_sel, eps)
            (loss_c * scale if scale != 1.0 else loss_c).backward()
        self.critic_losses.append(loss_c.detach())

    def critic_step(self) -> torch.Tensor:
        """The critic's AdamW step on its accumulated gradient; returns the gradient norm (0-dim)."""
        gn_c = grad_norm(trainable((self.critic or self.guidance).network), self.config.optim.grad_clip)
        self.opt_c.step()
        return gn_c

    def generator_backward(
        self, x0: torch.Tensor, inputs: DMDInputs, raw: Any, stage: int, scale: float = 1.0
    ) -> dict[str, float]:
        """Gradient of the generator objective on x0, then ONE backward through the student.

        Args:
            x0: (B, ...) the generator's output with grad (:meth:`step` computes it).
            inputs: the DMD inputs (:func:`~dmdr_fast.algo.generator.dmd_inputs`).
            raw: the batch's raw conditions (what rewards see).
            stage: 1 (DMD only) or 2 (DMD + rewards).
            scale: the backward's factor (``1/k`` for one of k accumulated micro-batches).

        The DMD direction and each reward's gradient are taken on a detached copy of ``x0``
        (:func:`~dmdr_fast.algo.generator.dmd_direction`, and through decode + reward), joined per
        sample by :func:`~dmdr_fast.algo.generator.add_reward_gradients` (``fixed``: exactly the
        gradient of ``L_DMD + weight·ℓ_R``; ``balanced``: norm-matched) and pushed through the
        student with ``x0.backward(g)``: the student's graph is traversed once whatever the number
        of rewards, and a non-finite reward gradient is zeroed instead of poisoning the weights.

        Returns:
            Metrics: ``loss_dmd`` (Decoupled: the weighted sum, plus ``loss_dm`` and ``loss_ca``),
            from stage 2 ``loss_reward`` and the reward logs and per reward group ``reward_w/*``,
            ``reward_nonfinite/*`` and, with DMD on, ``reward_cos/*`` and ``reward_push/*``.
        """
        d = self.config.dmdr
        backend = self.config.train.kernel_backend
        xd = x0.detach().requires_grad_(True)
        if self.rl is not None and stage == 2:  # advantage-weighted Decoupled DMD (train/rl.py)
            g, metrics = self.rl.weighted_direction(self, xd, inputs, raw)
            x0.backward(g.to(x0.dtype))
            return metrics
        g, metrics = dmd_direction(
            xd, inputs, dmd_weight=d.dmd_weight, ca_weight=d.ca_weight, eps=d.eps, backend=backend
        )
        if self.reward is not None and stage == 2:
            out = self.reward(self.student.decode(xd), raw)
            metrics["loss_reward"] = out.loss.detach().mean().item()
            metrics.update(out.log_values())
            groups = reward_groups(out.terms, self.reward_policies)
            g, reward_metrics = add_reward_gradients(
                g, xd, groups, with_dmd=d.dmd_weight > 0, backend=backend
            )
            metrics.update(reward_metrics)
        x0.backward((g * scale if scale != 1.0 else g).to(x0.dtype))
        return metrics

    def update_ema(self) -> None:
        """One EMA step of the student's trainable weights (no-op without EMA)."""
        if self.ema is not None:
            ema_update(self.ema, self.student.network, self.config.student.ema_decay)

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        """Temporarily load the EMA weights into the student (no-op without EMA)."""
        return swapped_weights(self.student.network, self.ema)

    # ------------------------------------------------------------------------------ the loop

    @deterministic_scope
    def fit(self, max_steps: int | None = None, *, progress: bool = True) -> TrainerState:
        """Train until ``max_steps`` generator updates (default ``train.max_steps``)."""
        cfg = self.config.train
        total = max_steps if max_steps is not None else cfg.max_steps
        if self.rank == 0 and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.config.save_yaml(self.out_dir / "config.yaml")
        if self.config.student.ode_init and not self.state.ode_init_done:
            self.ode_init(progress=progress)
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.state.gen_step, desc=f"DMDR {self.config.name}", unit="step")
        try:
            while self.state.gen_step < total:
                metrics = self.step()
                if metrics is None:
                    continue
                s = self.state.gen_step
                if bar is not None:
                    # refresh=False: the update below redraws once (not twice per step in logs)
                    dmd = f"{metrics.get('loss_dmd', math.nan):.3g}"
                    bar.set_postfix(stage=metrics["stage"], dmd=dmd, refresh=False)
                    bar.update(1)
                if s % cfg.log_every == 0 or s == total:
                    self.logger.log(s, metrics)
                if cfg.sample_every and s % cfg.sample_every == 0:
                    self.save_sample_grid()
                if self.monitor is not None:  # mean cosine since the last monitor evaluation
                    self.reward_cosines += [v for k, v in metrics.items() if k.startswith("reward_cos/")]
                    self.dmd_losses += [metrics["loss_dmd"]] if "loss_dmd" in metrics else []
                if (
                    self.monitor is not None
                    and self.config.monitor.every
                    and s % self.config.monitor.every == 0
                ):
                    warning = self.run_monitor()
                    if warning and bar is not None:
                        bar.write(f"WARNING: {warning}")
                if self.evaluator is not None and (
                    (cfg.eval_every and s % cfg.eval_every == 0) or s == total
                ):
                    self.evaluate()
                if cfg.checkpoint_every and self.out_dir is not None and s % cfg.checkpoint_every == 0:
                    self.save()
                if stop_requested():  # SIGINT/SIGTERM (train/interrupt.py): the save below, then out
                    break
        finally:
            if bar is not None:
                bar.close()
        if self.out_dir is not None:
            self.save()
        self.logger.flush()
        return self.state

    @deterministic_scope
    def ode_init(self, *, progress: bool = True) -> list[float]:
        """Regress the student onto the teacher's ODE pairs in ``student.ode_init`` (see
        :mod:`dmdr_fast.train.ode_init`), once per run: marked done and checkpointed afterwards."""
        from dmdr_fast.train.ode_init import run_ode_init

        return run_ode_init(self, progress=progress)

    @deterministic_scope
    def evaluate(self) -> dict[str, float]:
        """Run the evaluator, log ``eval/*`` and append to ``state.history``."""
        assert self.evaluator is not None
        with self.ema_weights():
            results = {k: float(v) for k, v in self.evaluator(self).items()}
        self.state.history.append({"step": self.state.gen_step, **results})
        self.logger.log(self.state.gen_step, {f"eval/{k}": v for k, v in results.items()})
        return results

    @deterministic_scope
    def run_monitor(self) -> str | None:
        """One reward-hacking monitor evaluation (see :mod:`dmdr_fast.train.monitor`); returns its warning."""
        assert self.monitor is not None
        values = self.monitor.measure(self)
        if self.reward_cosines:
            values["cosine"] = sum(self.reward_cosines) / len(self.reward_cosines)
        if self.dmd_losses:
            values["dmd_loss"] = sum(self.dmd_losses) / len(self.dmd_losses)
        self.reward_cosines, self.dmd_losses = [], []
        # Judged only while the reward acts on the generator (stage 2): stage-1 changes are DMD's own.
        active = self.reward is not None and self.config.stage(max(self.state.gen_step - 1, 0)) == 2
        warning = self.monitor.update(self.state.gen_step, values, active=active)
        row = self.monitor.history[-1]
        self.logger.log(self.state.gen_step, {f"monitor/{k}": v for k, v in row.items() if k != "step"})
        if warning:
            self.logger.note(f"WARNING: {warning}")
        return warning

    # ------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    @deterministic_scope
    def sample(
        self,
        raw_cond: Any,
        *,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Few-step samples of the student in the model's space (decode them for images).

        Args:
            raw_cond: raw conditions, one per sample (e.g. a (M,) label tensor, a list of prompts,
                or a :class:`~dmdr_fast.data.prompts.PromptBatch` with pre-encoded conditions).
            num_steps: sampling steps (default: the student's N; the grid keeps its shift).
            generator: RNG for the noise (default: a fresh one seeded with ``train.seed``, so
                that sampling never disturbs the training RNG).
            use_ema: sample with the EMA weights when EMA is on.
        """
        gen = generator if generator is not None else torch.Generator().manual_seed(self.config.train.seed)
        n = len(raw_cond)
        _, cond = self.encode(raw_cond)
        grid = self.grid if num_steps is None else self._grid(num_steps)
        noise = randn((n, *self.student.sample_shape), generator=gen, device=self.device)  # CPU or CUDA RNG
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        with ctx, self.autocast():
            x0 = few_step_sample(self.student.velocity, noise, cond, grid, generator=gen)
            assert isinstance(x0, torch.Tensor)  # not a trajectory: return_trajectory is False
            return x0.float()

    def save_sample_grid(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """A PNG grid of student samples for fixed noise and labels (rank 0 writes; needs out_dir).
        Under FSDP every rank samples (each forward is a collective)."""
        if (self.rank != 0 and not self.collective) or (path is None and self.out_dir is None):
            return None
        return write_sample_grid(self, path)

    # ------------------------------------------------------------------------------ checkpoints
    # (train/trainer_io.py holds the layout; these are the public entry points)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimisers, EMA, counters, RNG, config
        (under torchrun a collective: every rank calls it). Not under FSDP (sharded: :meth:`save`)."""
        return trainer_io.state_dict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the configs must describe the same networks)."""
        trainer_io.load_state_dict(self, sd)
        self._stage2_applied = False  # re-applied (explicitly) on the next step if in stage 2

    def save(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write a checkpoint atomically; by default ``out_dir/checkpoints/step_XXXXXXX.pt`` (rank 0),
        under FSDP the folder ``step_XXXXXXX/`` (every rank its shards). Every rank must call it."""
        return trainer_io.save(self, path)

    def resume(self, path: str | os.PathLike[str] | None = None, *, same_config: bool = True) -> bool:
        """Load ``path`` or the latest checkpoint under ``out_dir``; False if there is none. A
        sharded checkpoint loads at any world size; a config that changes the training is refused
        (``same_config=False``: take it anyway, to branch a run). See :func:`trainer_io.resume`."""
        self._stage2_applied = False  # as in load_state_dict
        return trainer_io.resume(self, path, same_config=same_config)

    def export_student(self) -> nn.Module:
        """A standalone copy of the student network (EMA weights when EMA is on)."""
        from dmdr_fast.models.attention import restore_attention
        from dmdr_fast.models.fp8 import dequantize_linears

        if self.sharded:  # one rank holds 1/N: pipelines.export gathers the shards onto rank 0
            raise UserError("under FSDP export with dmdr_fast.pipelines.export.export_student (every rank)")
        with self.ema_weights():
            # The copy gets the models' own attention and plain linears back (no FP8, docs/fp8.md):
            # it must not depend on dmdr_fast to run.
            return dequantize_linears(restore_attention(copy.deepcopy(self.student.network))).eval()
