"""The Trainer's checkpoints: what one holds, writing it, reading it back, resuming a run.

The :class:`~dmdr_fast.train.trainer.Trainer` methods of the same names call these (the Trainer
keeps the loop; this module keeps the state's layout). A file checkpoint (one process or DDP) is
:func:`state_dict` written atomically by rank 0 (:mod:`dmdr_fast.train.checkpoint`); under FSDP
each rank writes its shards of a folder (:mod:`dmdr_fast.train.sharded`). Either way the plain part
is :func:`meta`: config, counters, every rank's RNG streams, the monitor's and the RL state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdr_fast._errors import UserError
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train import sharded
from dmdr_fast.train.runtime import TrainerState, gather_streams, restore_streams

__all__ = ["load_meta", "load_state_dict", "meta", "resume", "save", "state_dict"]


def meta(trainer: Any) -> dict[str, Any]:
    """The non-tensor part of a checkpoint; gathers every rank's RNG streams (a collective)."""
    gens = gather_streams(trainer.gens, trainer.world)  # slot r·k + i: rank r's micro-batch i
    return {
        "format": ckpt.FORMAT,
        "config": trainer.config.to_dict(),
        "state": {
            "step": trainer.state.step,
            "gen_step": trainer.state.gen_step,
            "history": trainer.state.history,
            "ode_init_done": trainer.state.ode_init_done,
        },
        "rng": {"gen": gens[0], "gens": gens, "torch": torch.get_rng_state()},
        "critic_losses": [float(v) for v in trainer.critic_losses],
        "monitor": trainer.monitor.state_dict() if trainer.monitor is not None else None,
        "cosines": list(trainer.reward_cosines),
        "dmd_losses": list(trainer.dmd_losses),
        "rl": trainer.rl.state_dict() if trainer.rl is not None else None,
    }


def state_dict(trainer: Any) -> dict[str, Any]:
    """Everything needed to resume exactly: weights, optimisers, EMA, counters, RNG, config
    (under torchrun a collective: every rank calls it). Not under FSDP (sharded: :func:`save`)."""
    if trainer.sharded:
        raise ValueError("under FSDP the state is sharded: Trainer.save() writes sharded checkpoints")
    critic_owner = trainer.critic if trainer.critic is not None else trainer.guidance
    return {
        **meta(trainer),
        "student": ckpt.trainable_state(trainer.student.network),
        "critic": ckpt.trainable_state(critic_owner.network),
        "opt_g": trainer.opt_g.state_dict(),
        "opt_c": trainer.opt_c.state_dict(),
        "ema": trainer.ema,
    }


def load_state_dict(trainer: Any, sd: dict[str, Any]) -> None:
    """Inverse of :meth:`state_dict` (the configs must describe the same networks)."""
    ckpt.check_format(sd)
    critic_owner = trainer.critic if trainer.critic is not None else trainer.guidance
    ckpt.load_trainable_state(trainer.student.network, sd["student"], "student")
    ckpt.load_trainable_state(critic_owner.network, sd["critic"], "critic")
    trainer.opt_g.load_state_dict(sd["opt_g"])
    trainer.opt_c.load_state_dict(sd["opt_c"])
    if trainer.ema is not None and sd.get("ema") is not None:
        trainer.ema = {k: v.to(trainer.device) for k, v in sd["ema"].items()}
    load_meta(trainer, sd)


def load_meta(trainer: Any, sd: dict[str, Any]) -> None:
    rng = sd["rng"]
    note = restore_streams(
        trainer.gens, rng.get("gens") or [rng["gen"]], trainer.rank, trainer.config.train.seed
    )
    if note:
        trainer.logger.note(note)
    torch.set_rng_state(rng["torch"])
    st = sd["state"]
    trainer.state = TrainerState(
        step=st["step"],
        gen_step=st["gen_step"],
        history=list(st["history"]),
        ode_init_done=bool(st.get("ode_init_done", False)),
    )
    trainer.critic_losses = list(sd.get("critic_losses", []))
    if trainer.monitor is not None and sd.get("monitor") is not None:
        trainer.monitor.load_state_dict(sd["monitor"])
    trainer.reward_cosines = list(sd.get("cosines", []))
    trainer.dmd_losses = list(sd.get("dmd_losses", []))
    if trainer.rl is not None:
        trainer.rl.load_state_dict(sd.get("rl"))


def save(trainer: Any, path: str | os.PathLike[str] | None = None) -> Path | None:
    """Write a checkpoint atomically; by default ``out_dir/checkpoints/step_XXXXXXX.pt`` (rank 0),
    under FSDP the folder ``step_XXXXXXX/`` (every rank its shards). Every rank must call it."""
    if trainer.sharded:
        if path is not None or trainer.out_dir is None:
            raise ValueError("under FSDP, Trainer.save() writes sharded checkpoints into out_dir")
        tensors, plain = sharded.checkpoint_parts(trainer, meta(trainer))
        step, keep = trainer.state.gen_step, trainer.config.train.keep_checkpoints
        return sharded.save_sharded(
            trainer.out_dir, step, tensors, plain if trainer.rank == 0 else None, keep
        )
    sd = state_dict(trainer) if trainer.world > 1 or trainer.rank == 0 else None  # all ranks: RNG gather
    if trainer.rank != 0 or sd is None:
        return None
    if path is None:
        if trainer.out_dir is None:
            raise ValueError("Trainer.save needs a path or an out_dir")
        return ckpt.save_checkpoint(
            trainer.out_dir, trainer.state.gen_step, sd, trainer.config.train.keep_checkpoints
        )
    return ckpt.atomic_save(sd, Path(path))


def resume(trainer: Any, path: str | os.PathLike[str] | None = None, *, same_config: bool = True) -> bool:
    """Load ``path`` or the latest checkpoint under ``out_dir``; False if there is none.

    A sharded checkpoint (a folder) loads at any world size, with or without FSDP. A config that
    changes the training is refused, naming the fields (``checkpoint.MAY_CHANGE``: what may
    change); ``same_config=False`` takes the checkpoint anyway (branching another run from it)."""
    if path is None:
        path = ckpt.latest_checkpoint(trainer.out_dir) if trainer.out_dir is not None else None
        if path is None:
            return False
    is_folder = sharded.is_sharded_checkpoint(Path(path))
    if trainer.sharded and not is_folder:
        raise UserError(f"{path} is a single-file checkpoint: resume it with train.parallel=ddp")
    # Onto the CPU, not the training device: the RNG states must be CPU tensors, and a full
    # fine-tune's weights + Adam moments + EMA would otherwise sit on the GPU twice.
    sd = ckpt.load_checkpoint(Path(path) / ckpt.META if is_folder else path)  # runs no code
    if same_config:
        # The saved world size: its RNG streams are one per (rank, micro-batch) slot.
        slots = len(sd["rng"].get("gens") or [sd["rng"]["gen"]])
        k = int(sd["config"].get("train", {}).get("grad_accum", 1))
        world = max(slots // max(k, 1), 1)
        ckpt.check_resume_config(
            sd["config"], trainer.config.to_dict(), path, saved_world=world, world=trainer.world
        )
    if is_folder:
        load_meta(trainer, sharded.resume_into(trainer, Path(path)))
    else:
        load_state_dict(trainer, sd)
    trainer.logger.note(f"resumed from {path} at generator step {trainer.state.gen_step}")
    return True
