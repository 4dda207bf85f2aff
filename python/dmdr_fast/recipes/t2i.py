"""Text-to-image DMDR on a local diffusers pipeline folder: build → train → compare → export.

``dmdr-fast train --preset sd35-large-4step --set model.path=/models/sd35l --out DIR`` (or any
config with ``model.family`` in :data:`T2I_FAMILIES`) runs :func:`run_t2i`:

1. load the teacher pipeline through its family's adapter (``model.weights_dtype``, memory savers,
   optional tiny VAE for the rewards);
2. conditions: from the prompt-embedding cache (``data.cache``; the text encoders are then freed)
   or by encoding ``data.prompts`` on the fly; held-out prompts (``data.eval_prompts``) are encoded
   once, before the encoders go;
3. DMDR with the configured rewards (:func:`dmdr_fast.rewards.rewards_from_config`) and, when
   ``monitor.every > 0``, the reward-hacking monitor on the held-out prompts (diversity + rewards);
4. a teacher (multi-step Euler with CFG) vs student (N steps) grid on the held-out prompts, their
   reward scores, and the export (:func:`dmdr_fast.pipelines.export.export_student`) to
   ``DIR/export`` — a diffusers pipeline folder (full student) or a LoRA folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dmdr_fast._dtypes import torch_dtype
from dmdr_fast.conditions import index_cond
from dmdr_fast.config import ConfigError, DMDRTrainerConfig, ModelConfig
from dmdr_fast.data.prompt_cache import model_identity
from dmdr_fast.data.prompts import PromptBatch
from dmdr_fast.models.families import T2I_FAMILIES, family_of_pipeline, get_family
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train import interrupt, run_dir
from dmdr_fast.train.trainer import Trainer, resolve_device

if TYPE_CHECKING:
    from dmdr_fast.models.t2i import TextToImageAdapter

__all__ = [
    "T2I_FAMILIES",
    "EncodedPromptSampler",
    "adapter_class",
    "bench_trainer",
    "build_adapter",
    "build_data",
    "default_preset",
    "encoding_settings",
    "family_of_pipeline",
    "model_identity",
    "run_t2i",
    "teacher_sample",
]

NUM_EVAL_PROMPTS = 8


class EncodedPromptSampler:
    """Samples (with replacement) from prompts encoded once in memory (for benchmarks and small runs).

    Args:
        batch: The prompts and their encoded condition batch.
    """

    def __init__(self, batch: PromptBatch) -> None:
        if len(batch) == 0:
            raise ValueError("EncodedPromptSampler needs at least one prompt")
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    def sample(self, batch_size: int, generator: torch.Generator) -> PromptBatch:
        index = torch.randint(len(self.batch), (batch_size,), generator=generator)
        prompts = [self.batch.prompts[i] for i in index.tolist()]
        return PromptBatch(prompts=prompts, condition=index_cond(self.batch.condition, index))


def bench_trainer(config: DMDRTrainerConfig, *, num_prompts: int = 64) -> Trainer:
    """A Trainer on ``config.model`` with synthetic prompts encoded once (text encoders then freed)."""
    adapter = build_adapter(config.model, device=resolve_device(config.train.device))
    prompts = [f"a photo of object number {i}, studio light" for i in range(num_prompts)]
    batch = PromptBatch(prompts=prompts, condition=adapter.encode_condition(prompts))
    adapter.drop_text_encoders()
    # The group-relative modes need their (scored) rewards; a differentiable-reward run's bench
    # leaves them out (the paper baseline has none).
    from dmdr_fast.rewards import rewards_from_config

    reward = rewards_from_config(config.rewards) if config.rl.enabled else None
    return Trainer(config, adapter, reward=reward, data=EncodedPromptSampler(batch))


def adapter_class(family: str) -> type[TextToImageAdapter]:
    """The adapter class of a text-to-image family (imports diffusers; the family registry's entry)."""
    try:
        return get_family(family).adapter
    except ValueError as err:
        raise ConfigError(str(err), field="model.family") from None


def default_preset(family: str) -> str:
    """The preset a bare ``--pipeline DIR`` command uses for ``family``."""
    return get_family(family).default_preset


def build_adapter(model: ModelConfig, *, device: torch.device | str | None = None) -> Any:
    """Load ``model.path`` through the family's adapter, with the config's memory settings."""
    if model.path is None:
        raise ConfigError(
            "is required for text-to-image families: a local diffusers pipeline folder (model_index.json "
            "and component folders), or a hub id when online",
            field="model.path",
        )
    cls = adapter_class(model.family)
    adapter = cls.from_pretrained(
        model.path, device=device, torch_dtype=torch_dtype(model.load_dtype), **model.kwargs
    )
    adapter.enable_memory_savers(
        gradient_checkpointing=model.gradient_checkpointing,
        vae_slicing=model.vae_slicing,
        vae_tiling=model.vae_tiling,
    )
    if model.tiny_vae is not None:
        adapter.use_tiny_vae(model.tiny_vae)
    return adapter


def encoding_settings(model: ModelConfig) -> dict[str, Any]:
    """The ``model.*`` fields that can change a prompt's encoding (dotted name → value): stored in
    a prompt cache so that a cache built with other overrides than training names them."""
    out: dict[str, Any] = {"model.family": model.family, "model.path": model.path}
    out.update({f"model.kwargs.{k}": v for k, v in sorted(model.kwargs.items())})
    out["model.weights_dtype"] = model.weights_dtype  # the text encoders' load dtype follows it
    return out


def build_data(config: DMDRTrainerConfig, adapter: Any) -> tuple[Any, PromptBatch]:
    """The training condition sampler and the encoded held-out prompts.

    With ``data.cache`` the cache is checked against the adapter (a cache built for another model
    is refused), its null condition is installed and, with ``data.offload_text_encoders``, the text
    encoders are freed after the held-out prompts are encoded.
    """
    from dmdr_fast.data.prompt_cache import CachedPromptSampler, PromptCache, install_null_condition
    from dmdr_fast.data.prompts import PromptSampler, load_prompts

    data = config.data
    if data.cache is None and data.prompts is None:
        raise ConfigError("needs data.prompts (a .txt/.jsonl/.csv file) or data.cache", field="data")
    model_id = model_identity(config.model.path)
    cache = (
        PromptCache.open(data.cache, adapter, model_id=model_id, settings=encoding_settings(config.model))
        if data.cache is not None
        else None
    )
    if cache is not None:
        install_null_condition(adapter, cache)
        sampler: Any = CachedPromptSampler(cache)
        pool = list(cache.prompts)
    else:
        assert data.prompts is not None  # checked above: no cache, so prompts
        pool = load_prompts(data.prompts, column=data.column)
        sampler = PromptSampler(tuple(pool))
    prompts = list(data.eval_prompts) or pool[:NUM_EVAL_PROMPTS]
    if cache is not None and not data.eval_prompts:  # the cache has them: no encoder needed
        eval_batch = PromptBatch(prompts=prompts, condition=cache.condition(list(range(len(prompts)))))
    else:
        eval_batch = PromptBatch(prompts=prompts, condition=adapter.encode_condition(prompts))
    if cache is not None and data.offload_text_encoders:
        adapter.drop_text_encoders()
    return sampler, eval_batch


@torch.no_grad()
def teacher_sample(
    trainer: Trainer, batch: PromptBatch, *, steps: int, guidance: float, seed: int
) -> torch.Tensor:
    """Teacher samples (Euler, CFG ``guidance`` with the null condition) in latent space."""
    from dmdr_fast.algo import euler_sample, uses_cfg
    from dmdr_fast.models.lora import lora_layers, lora_scale

    _, cond = trainer.encode(batch)
    n = len(batch)
    noise = torch.randn((n, *trainer.student.sample_shape), generator=torch.Generator().manual_seed(seed))
    guide = trainer.guidance
    null = guide.null_condition(n) if uses_cfg(guidance) else None
    # LoRA scale 0 turns the critic LoRA off: the plain teacher (a full critic leaves it LoRA-free).
    plain = lora_scale(guide.network, 0.0) if any(True for _ in lora_layers(guide.network)) else nullcontext()
    with plain, trainer.autocast():
        return euler_sample(
            guide.velocity,
            noise.to(trainer.device),
            cond,
            num_steps=steps,
            # the teacher's own sampling shift (Flux: its resolution-dependent dynamic shift)
            shift=float(
                guide.pipeline_shift() if hasattr(guide, "pipeline_shift") else getattr(guide, "shift", 1.0)
            ),
            guidance=guidance,
            null_cond=null,
        ).float()


def _images_in_chunks(
    batch: PromptBatch, size: int, draw: Callable[[PromptBatch, int], torch.Tensor]
) -> torch.Tensor:
    """``draw(chunk, i)`` over chunks of ``size`` prompts, the images collected on the CPU (a whole
    held-out set at once would not fit next to a large model)."""
    out = []
    for i, start in enumerate(range(0, len(batch), size)):
        idx = torch.arange(start, min(start + size, len(batch)))
        part = PromptBatch(
            prompts=[batch.prompts[j] for j in idx], condition=index_cond(batch.condition, idx)
        )
        out.append(draw(part, i).float().cpu())
    return torch.cat(out)


def run_t2i(
    config: DMDRTrainerConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    teacher_steps: int = 28,
    export: bool = True,
) -> dict[str, Any]:
    """Train a text-to-image student, compare it with the teacher, export it. Returns the metrics."""
    from dmdr_fast.eval.plots import plot_monitor
    from dmdr_fast.eval.t2i import clip_features, compare_t2i, save_t2i_grid, scorers_from_rewards
    from dmdr_fast.pipelines.export import export_student
    from dmdr_fast.rewards import rewards_from_config
    from dmdr_fast.train.monitor import RewardHackingMonitor, repeat_conditions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = resolve_device(config.train.device)
    adapter = build_adapter(config.model, device=device)  # text encoders run on the device too
    sampler, eval_batch = build_data(config, adapter)
    reward = rewards_from_config(config.rewards, device=device)
    monitor = RewardHackingMonitor(eval_batch, config=config.monitor) if config.monitor.every else None
    resuming = resume and ckpt.latest_checkpoint(out) is not None  # the checkpoint holds the student
    trainer = Trainer(
        config, adapter, reward=reward, data=sampler, out_dir=out, monitor=monitor, load_init=not resuming
    )
    if resume:
        found = ckpt.latest_checkpoint(out)
        if found is not None:
            trainer.resume(found)
        run_dir.say_resumed(trainer.rank, found, trainer.state.gen_step, out, quiet=not progress)
    t_setup = time.perf_counter() - t0
    interrupt.fit(trainer, progress=progress)  # a signal: checkpoint, then TrainingInterrupted
    t_train = time.perf_counter() - t0 - t_setup
    # Under FSDP every forward is a collective (train/parallel.py): all ranks export (the student is
    # gathered onto rank 0, which writes) and draw the comparison images; rank 0 alone scores and
    # reports. Under DDP the other ranks are done.
    if trainer.rank != 0 and not trainer.collective:
        return {"rank": trainer.rank}

    # Export first: the comparison below is a report, the export is what the run is for.
    export_dir = export_student(trainer, out / "export") if export else None
    # Teacher vs student on the held-out prompts, K samples each (K = the monitor's): scores, win
    # rates, diversity and drift from the teacher (dmdr_fast.eval.t2i).
    n_steps, w = config.student.num_steps, config.dmdr.guidance
    k = config.monitor.samples_per_condition
    held = repeat_conditions(eval_batch, k)
    chunk = config.train.batch_size
    s_img = _images_in_chunks(
        held,
        chunk,
        lambda b, i: trainer.student.decode(
            trainer.sample(b, generator=torch.Generator().manual_seed(4321 + i))
        ),
    )
    t_img = _images_in_chunks(
        held, chunk,
        lambda b, i: trainer.student.decode(teacher_sample(trainer, b, steps=teacher_steps, guidance=w, seed=4321 + i)),
    )  # fmt: skip
    if trainer.rank != 0:
        return {"rank": trainer.rank}
    teacher_name = f"teacher ({teacher_steps}-step Euler, CFG {w:g})"
    comparison = compare_t2i(
        {teacher_name: t_img, f"student ({n_steps}-step {config.method_name})": s_img},
        eval_batch.prompts,
        per_prompt=k,
        scorers=scorers_from_rewards(trainer.reward),
        features=clip_features(trainer.reward),
        batch_size=chunk,
        feature_name="CLIP image",
    )
    save_t2i_grid(
        {f"teacher {teacher_steps} steps": t_img, f"student {n_steps} steps": s_img},
        eval_batch.prompts,
        k,
        out / "teacher_vs_student.png",
    )
    if trainer.monitor is not None and trainer.monitor.history:
        plot_monitor({config.name: trainer.monitor.history}, out / "monitor.png")
    elapsed = time.perf_counter() - t0
    metrics = {
        "comparison": comparison,
        "monitor": trainer.monitor.history if trainer.monitor is not None else [],
        "monitor_warnings": trainer.monitor.warnings if trainer.monitor is not None else [],
        "eval_prompts": list(eval_batch.prompts),
        "export": str(export_dir) if export_dir is not None else None,
        "timing_s": {"setup": t_setup, "train": t_train, "total": elapsed},
        "config": config.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    _write_report(out, config, metrics, trainer)
    return metrics


def _write_report(out: Path, config: DMDRTrainerConfig, metrics: dict[str, Any], trainer: Trainer) -> None:
    from dmdr_fast.eval.t2i import format_comparison

    export = metrics["export"]
    info = {}
    if export is not None:
        info = json.loads((Path(export) / "dmdr_export.json").read_text())
    lines = [
        f"# Text-to-image report — {config.name} ({config.method_name})",
        "",
        f"Teacher: `{config.model.path}` ({config.model.family}); student: {config.student.kind}, "
        f"{config.student.num_steps} steps; {trainer.state.gen_step} generator steps. "
        f"{config.training_summary()}.",
        "",
        format_comparison(metrics["comparison"]),
        "",
        "![teacher vs student](teacher_vs_student.png)",
        "",
    ]
    if trainer.monitor is not None and trainer.monitor.history:
        lines += [
            f"Reward-hacking monitor: **{trainer.monitor.verdict()}**.",
            "",
            "![monitor](monitor.png)",
            "",
        ]
    if info:
        lines += ["## Using the exported student", "", "```python", *_usage(info, export), "```", ""]
    t = metrics["timing_s"]
    lines.append(f"Time: setup {t['setup']:.0f} s, training {t['train']:.0f} s, total {t['total']:.0f} s.")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _usage(info: dict[str, Any], export: str) -> list[str]:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["call_kwargs"].items())
    if info["kind"] == "lora":
        return [
            "import diffusers",
            f"pipe = diffusers.DiffusionPipeline.from_pretrained({info['base_pipeline']!r})",
            f"pipe.load_lora_weights({export!r})",
            f"pipe.scheduler = diffusers.{info['scheduler_class']}.from_pretrained({export!r}, subfolder='scheduler')",
            f"image = pipe('a photo of a cat', {kwargs}).images[0]",
        ]
    return [
        "import diffusers",
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({export!r})",
        f"image = pipe('a photo of a cat', {kwargs}).images[0]",
    ]
