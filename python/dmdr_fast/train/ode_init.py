"""ODE-regression initialisation of the student: teacher pairs, then ``G(z) ≈ ODE_teacher(z)``.

DMDR's SDXL 1-step recipe (docs/method.md §10) does not start DMD from the teacher's weights but
from DMD2's ODE-regression checkpoint: a 1-step student taken straight from the teacher produces
noise artifacts early in DMD training. The recipe:

1. **pairs** — noise ``z`` and the teacher's deterministic sample ``x0 = ODE(z | c)`` (Euler with
   the teacher's CFG) for N conditions (DMD2/DMDR: 10K prompts): :func:`generate_ode_pairs`,
   ``dmdr-fast ode-pairs``;
2. **regression** — the student's first step ``x̂0 = z − t_0·G(z, t_0, c)`` trained onto ``x0``
   with a mean-squared error: :func:`ode_regression`, run by the Trainer before DMD when
   ``student.ode_init`` names a pairs folder.

Differences from DMD2, stated plainly: DMD2 regressed with LPIPS on decoded images (and SDXL's
student was conditioned on timestep 399); here the loss is the MSE in the model's sample space
(latents; no LPIPS weights offline) at the student's own first time ``t_0`` (1: pure noise).

Generating 10K teacher solves takes hours on a GPU, so nothing is lost on interruption: the
folder is built in ``<out>.tmp`` with a ``progress.json`` written after each shard, and the same
command with the same settings continues after the last complete shard (batch b's noise comes from
``seed + b``, so a resumed folder equals an uninterrupted one bit for bit); other settings start over.

A pairs folder holds ``ode_pairs.json`` (written last: a folder without it is incomplete), shards
``pairs-XXXXX.safetensors`` with ``noise``, ``x0`` and ``index`` (into the conditions), and the
conditions: a prompt cache in ``cache/`` (text-to-image; checked against the model like any
prompt cache) or the ``labels`` list in the JSON (class-conditional models).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dmdr_fast._io import PROGRESS_NAME, atomic_write_text, load_safetensors, read_progress, write_progress
from dmdr_fast.conditions import to_device
from dmdr_fast.config import OptimConfig

__all__ = ["ODEPairs", "generate_ode_pairs", "ode_regression", "run_ode_init"]

_META = "ode_pairs.json"
_FORMAT = 1


@torch.no_grad()
def generate_ode_pairs(
    adapter: Any,
    conditions: Sequence[str] | torch.Tensor,
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 50,
    guidance: float = 1.0,
    shift: float | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    model_id: str | None = None,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Solve the teacher's ODE from fresh noise for each condition and store the pairs.

    Args:
        adapter: The teacher (a :class:`~dmdr_fast.models.protocol.FlowModelAdapter`; text-to-image
            adapters need their text encoders here).
        conditions: Prompts (text-to-image: encoded once into ``out_dir/cache``) or ``(N,)`` labels.
        out_dir: Output folder; built in ``<out_dir>.tmp`` and renamed when complete. An
            interrupted build with the same settings is continued, not restarted.
        steps: Euler steps of the teacher's sampler (DMD2: the teacher's usual count).
        guidance: The teacher's CFG scale w (<= 1: none).
        shift: Grid shift (default: the adapter's sampling shift, Flux its dynamic one).
        batch_size: Samples per teacher solve.
        shard_size: Pairs per shard file.
        seed: Noise of pair i comes from ``torch.Generator().manual_seed(seed + i // batch_size)``.
        dtype: Storage dtype of ``noise``/``x0`` (default float32).
        model_id: What identifies the teacher's weights (e.g. its folder), checked on use.
        device: Where the teacher runs (default: where it is).
        autocast: Run the teacher under ``torch.autocast`` in this dtype (e.g. ``torch.bfloat16``).
        progress: Show a progress bar.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from dmdr_fast.algo import euler_sample, uses_cfg

    out = Path(out_dir)
    if (out / _META).is_file():
        raise FileExistsError(f"{out} already holds ODE pairs; choose another folder or delete it")
    if steps < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"steps, batch_size and shard_size must be >= 1, got {steps}, {batch_size}, {shard_size}"
        )
    tmp = out.with_name(out.name + ".tmp")
    dev = torch.device(device) if device is not None else _device(adapter)
    store = dtype or torch.float32
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    if isinstance(conditions, torch.Tensor):
        labels = conditions.reshape(-1).long()
        n = labels.numel()
    else:
        prompts = [str(p) for p in conditions]
        n = len(prompts)
    if n == 0:
        raise ValueError("conditions must not be empty")
    if shift is None:
        shift = float(
            adapter.pipeline_shift() if hasattr(adapter, "pipeline_shift") else getattr(adapter, "shift", 1.0)
        )
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "steps": steps,
        "guidance": float(guidance),
        "seed": seed,
        "count": n,
        "shift": float(shift),
        "sample_shape": list(adapter.sample_shape),
        "dtype": str(store).removeprefix("torch."),
        "fingerprint": adapter.text_fingerprint() if hasattr(adapter, "text_fingerprint") else None,
        "model_id": model_id,
    }
    conds = labels.tolist() if labels is not None else prompts
    # What a partial folder must have been made with to be continued (sizes fix the shard layout).
    identity = {
        **meta,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "conditions": hashlib.sha256(json.dumps(conds).encode()).hexdigest(),
    }
    resumed = read_progress(tmp, identity)
    if resumed is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards = list(resumed["shards"]) if resumed else []
    done = sum(s["count"] for s in shards)
    if done and progress:
        print(f"ode pairs: continuing {tmp} after {done} of {n} pairs", file=sys.stderr)
    if labels is not None:
        meta["labels"] = conds

        def cond_of(idx: torch.Tensor) -> Any:
            return to_device(adapter.encode_condition(labels[idx]), dev)

    else:
        from dmdr_fast.data.prompt_cache import PromptCache, build_prompt_cache

        assert prompts is not None  # the conditions are prompts
        # A complete cache from the interrupted run is kept (build_prompt_cache sees it is current).
        build_prompt_cache(adapter, prompts, tmp / "cache", progress=progress, model_id=model_id, dtype=dtype)
        cache = PromptCache.open(tmp / "cache", adapter, model_id=model_id)

        def cond_of(idx: torch.Tensor) -> Any:
            return to_device(cache.condition(idx), dev)

    buf: dict[str, list[torch.Tensor]] = {"noise": [], "x0": [], "index": []}

    def flush() -> None:
        if not buf["index"]:
            return
        name = f"pairs-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
        save_file(tensors, str(tmp / name))
        shards.append({"file": name, "count": int(tensors["index"].numel())})
        write_progress(tmp, identity, shards)
        for v in buf.values():
            v.clear()

    ctx = (
        torch.autocast(dev.type, dtype=autocast)
        if autocast is not None
        else torch.autocast(dev.type, enabled=False)
    )
    bar = tqdm(total=n, initial=done, desc="ode pairs", unit="pair", disable=not progress)
    # Shards end on batch boundaries (flushed after whole batches), so `done` is a multiple of
    # batch_size and the next batch is done // batch_size, with its own seed as before.
    for b in range(done // batch_size, -(-n // batch_size)):
        start = b * batch_size
        idx = torch.arange(start, min(start + batch_size, n))
        g = torch.Generator().manual_seed(seed + b)
        z = torch.randn((idx.numel(), *adapter.sample_shape), generator=g)
        cond = cond_of(idx)
        null = adapter.null_condition(idx.numel()) if uses_cfg(guidance) else None
        with ctx:
            x0 = euler_sample(
                adapter.velocity,
                z.to(dev),
                cond,
                num_steps=steps,
                shift=shift,
                guidance=guidance,
                null_cond=null,
            )
        buf["noise"].append(z.to(store))
        buf["x0"].append(x0.float().cpu().to(store))
        buf["index"].append(idx)
        if sum(t.numel() for t in buf["index"]) >= shard_size:
            flush()
        bar.update(idx.numel())
    flush()
    bar.close()
    meta["shards"] = shards
    atomic_write_text(tmp / _META, json.dumps(meta, indent=1) + "\n")
    (tmp / PROGRESS_NAME).unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class ODEPairs:
    """An opened pairs folder: ``len``, and :meth:`batch` of (noise, x0, condition)."""

    def __init__(self, path: Path, meta: dict[str, Any], cache: Any) -> None:
        self.path, self.meta, self.cache = path, meta, cache
        self._offsets = [0]
        for s in meta["shards"]:
            self._offsets.append(self._offsets[-1] + s["count"])
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], adapter: Any = None, *, model_id: Any = None) -> ODEPairs:
        """Open a complete pairs folder; with ``adapter``, refuse pairs made for another model.

        Raises:
            FileNotFoundError: No ``ode_pairs.json`` (missing or incomplete folder).
            ValueError: The pairs do not fit ``adapter`` (sample shape, text encoders, weights).
        """
        folder = Path(path)
        meta_path = folder / _META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no complete ODE pairs ({_META} missing); make them with `dmdr-fast ode-pairs`"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{folder}: ODE pairs format {meta.get('format')!r}, expected {_FORMAT}")
        cache = None
        if "labels" not in meta:
            from dmdr_fast.data.prompt_cache import PromptCache

            cache = PromptCache.open(folder / "cache", adapter, model_id=model_id)
        if adapter is not None:
            shape = list(adapter.sample_shape)
            if shape != meta["sample_shape"]:
                raise ValueError(
                    f"ODE pairs in {folder} have samples of shape {meta['sample_shape']}, the model {shape} "
                    "(another resolution or model?)"
                )
        if model_id is not None and meta.get("model_id") not in (None, str(model_id)):
            raise ValueError(
                f"ODE pairs in {folder} were made with {meta['model_id']!r}, not {str(model_id)!r}"
            )
        return cls(folder, meta, cache)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._loaded:
            self._loaded[i] = load_safetensors(self.path / self.meta["shards"][i]["file"])
        return self._loaded[i]

    def batch(self, positions: torch.Tensor, adapter: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(noise, x0, condition)`` of the pairs at ``positions`` (B,), on the CPU, float32."""
        import bisect

        zs, xs, idx = [], [], []
        for p in positions.tolist():
            s = bisect.bisect_right(self._offsets, p) - 1
            shard, j = self._shard(s), p - self._offsets[s]
            zs.append(shard["noise"][j])
            xs.append(shard["x0"][j])
            idx.append(int(shard["index"][j]))
        index = torch.tensor(idx)
        if self.cache is not None:
            cond = self.cache.condition(index)
        else:
            cond = adapter.encode_condition(torch.tensor(self.meta["labels"])[index])
        return torch.stack(zs).float(), torch.stack(xs).float(), cond


def ode_regression(
    forward: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    pairs: ODEPairs,
    adapter: Any,
    *,
    t0: torch.Tensor,
    steps: int,
    lr: float,
    optim: OptimConfig,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 10,
    progress: bool = True,
) -> list[float]:
    """Train the student's first step onto the teacher's ODE samples: ``‖z − t_0·G(z, t_0) − x0‖²``.

    A separate AdamW (the DMD optimiser's state is untouched); the caller resets its EMA copy.

    Args:
        forward: The student's velocity with grad (the DDP-wrapped network under torchrun).
        params: Its trainable parameters (full or LoRA).
        pairs: The teacher's ODE pairs.
        adapter: The student adapter (encodes the pairs' class labels).
        t0: The student's first time (its grid's ``t_0``).
        steps: Optimiser steps.
        lr: Learning rate.
        optim: ``betas``, ``adam_eps`` and ``grad_clip`` (0 = no clipping) of the run.
        batch_size: Pairs per step.
        generator: Draws the pairs (the run's RNG: a resumed run replays it).
        device: Where the student is.
        autocast: The run's autocast context.
        log: ``log(step, metrics)``: gets ``ode/step`` and ``ode/loss`` at generator step 0 (the
            regression comes before any DMD update) every ``log_every`` steps and at the end.
        log_every: Logging cadence.
        progress: Show a progress bar.

    Returns:
        The per-step losses.
    """
    from tqdm.auto import tqdm

    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=optim.betas, eps=optim.adam_eps, weight_decay=0.0)
    losses: list[torch.Tensor] = []  # read out at the log points only (each read waits for the device)
    bar = tqdm(range(steps), desc="ode init", disable=not progress)
    for step in bar:
        positions = torch.randint(len(pairs), (batch_size,), generator=generator)
        z, x0, cond = pairs.batch(positions, adapter)
        z, x0, cond = z.to(device), x0.to(device), to_device(cond, device)
        t = t0.expand(batch_size).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast():
            v = forward(z, t, cond)
        pred = z - t.view(-1, *[1] * (z.dim() - 1)) * v.float()
        loss = F.mse_loss(pred, x0)
        loss.backward()
        if optim.grad_clip > 0:  # 0 = no clipping (clip_grad_norm_ with 0 would zero the gradients)
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        opt.step()
        losses.append(loss.detach())
        if (step + 1) % max(1, log_every) == 0 or step + 1 == steps:
            if log is not None:
                log(0, {"ode/step": step + 1, "ode/loss": float(losses[-1])})
            bar.set_postfix(loss=f"{float(losses[-1]):.4g}")
    return [float(v) for v in losses]


def _device(adapter: Any) -> torch.device:
    net = getattr(adapter, "network", adapter)
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def run_ode_init(trainer: Any, *, progress: bool = True) -> list[float]:
    """:meth:`dmdr_fast.train.Trainer.ode_init`: regress ``trainer``'s student onto the ODE pairs of
    ``student.ode_init``, start the EMA from the result, mark it done and checkpoint."""
    from dmdr_fast.data.prompt_cache import model_identity
    from dmdr_fast.train.runtime import trainable

    s, cfg = trainer.config.student, trainer.config
    assert s.ode_init is not None  # fit() calls this only when it is set
    pairs = ODEPairs.open(s.ode_init, trainer.student, model_id=model_identity(cfg.model.path))
    losses = ode_regression(
        trainer.student_forward, trainable(trainer.student.network), pairs, trainer.student,
        t0=trainer.grid[0], steps=s.ode_steps, lr=s.ode_lr, optim=cfg.optim,
        batch_size=cfg.train.batch_size, generator=trainer.gen, device=trainer.device,
        autocast=trainer.autocast, log=trainer.logger.log, log_every=cfg.train.log_every,
        progress=progress and trainer.rank == 0,
    )  # fmt: skip
    if trainer.ema is not None:  # the EMA starts from the regressed weights
        with torch.no_grad():
            for n, p in trainer.student.network.named_parameters():
                if n in trainer.ema:
                    trainer.ema[n].copy_(p.detach())
    trainer.state.ode_init_done = True
    trainer.logger.note(
        f"ODE init: {s.ode_steps} steps on {len(pairs)} pairs from {s.ode_init}, "
        f"loss {losses[0]:.4g} → {losses[-1]:.4g}"
    )
    if trainer.out_dir is not None:
        trainer.save()
    return losses
