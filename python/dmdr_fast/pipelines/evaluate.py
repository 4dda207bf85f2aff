"""Evaluate an exported student against its teacher with plain diffusers (``dmdr-fast eval --pipeline``).

Both models run as users run them: the teacher pipeline with its own scheduler, its usual step
count and CFG (its :class:`~dmdr_fast.models.families.ModelFamily` entry); the student with the exported few-step scheduler and
call arguments (``dmdr_export.json``), at the same resolution and text length. Each prompt gets K
samples (seeds ``seed + i`` per chunk of prompts), scored and compared by
:func:`dmdr_fast.eval.t2i.compare_t2i`. A LoRA student is applied to the already loaded teacher
pipeline (one copy of the weights in memory); a full student replaces it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmdr_fast._dtypes import load_dtype_kwargs
from dmdr_fast._errors import UserError
from dmdr_fast._io import check_no_code, omitted_components
from dmdr_fast.pipelines.export import check_exported, load_exported, read_export_info, sample_exported

__all__ = ["evaluate_exported", "write_evaluation"]

# Call arguments that must match between teacher and student for a fair comparison.
_SHARED_KWARGS = ("height", "width", "max_sequence_length")


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sample_all(
    call: Callable[[list[str], int], torch.Tensor], prompts: list[str], batch: int, progress: Any
) -> torch.Tensor:
    out = []
    for i, chunk in enumerate(_chunks(prompts, batch)):
        out.append(call(chunk, i).float().cpu())
        progress.update(len(chunk))
    return torch.cat(out)


def evaluate_exported(
    teacher: str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    student: str | os.PathLike[str] | None = None,
    lora: str | os.PathLike[str] | None = None,
    per_prompt: int = 4,
    rewards: Any = None,
    teacher_steps: int | None = None,
    teacher_guidance: float | None = None,
    steps: int | None = None,
    batch: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    reference_images: str | os.PathLike[str] | None = None,
    reference_limit: int | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Sample the teacher and an exported student on the same prompts and compare them.

    Args:
        teacher: the teacher's diffusers pipeline folder.
        prompts: the N evaluation prompts (held out from training).
        student: an exported full-student pipeline folder; or
        lora: an exported LoRA folder (applied to ``teacher``). Exactly one of the two.
        per_prompt: K samples per prompt (diversity needs K >= 2).
        rewards: a :class:`~dmdr_fast.rewards.CompositeReward` or list of rewards to score with
            (None: diversity and FD only); a CLIP-type reward also gives the features.
        teacher_steps: default the family's usual count (its :class:`~dmdr_fast.models.families.ModelFamily` entry).
        teacher_guidance: default the family's usual guidance.
        steps: student steps (default: the exported count).
        batch: prompts per pipeline call.
        seed: base seed; chunk i uses ``seed + i`` for both models.
        device: where the pipelines run.
        dtype: load dtype (default: as saved).
        progress: show a progress bar.
        reference_images: a folder of real images: adds FD and MMD² to them for both models, in the
            comparison's features (CLIP when a CLIP-type reward is given, else pixels).
        reference_limit: use at most this many reference images.

    Returns:
        ``(result, images)``: :func:`~dmdr_fast.eval.t2i.compare_t2i`'s result plus the settings
        used, and the two models' ``(N·K, 3, H, W)`` images on the CPU.
    """
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from dmdr_fast.eval.t2i import clip_features, compare_t2i, image_folder_features, scorers_from_rewards
    from dmdr_fast.models.families import family_of_pipeline, get_family

    if (student is None) == (lora is None):
        raise UserError(
            "give exactly one of --student (an exported pipeline folder) or --lora (an exported LoRA folder)"
        )
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must not be empty")
    if per_prompt < 1 or batch < 1:
        raise ValueError(f"per_prompt and batch must be >= 1, got {per_prompt} and {batch}")
    for name, count in (("steps", steps), ("teacher_steps", teacher_steps)):
        if count is not None and count < 1:  # 0 must not silently mean "the default"
            raise ValueError(f"{name} must be >= 1 (or None for the default), got {count}")
    # Missing or mismatched folders are refused here, not after the teacher's (long) pass.
    check_exported(teacher, lora=lora, what=("--pipeline", "--lora"))
    if student is not None:
        check_exported(student, what=("--student", "--lora"))
    folder = student if student is not None else lora
    assert folder is not None  # exactly one of them is given (checked above)
    exported = Path(folder)
    info = read_export_info(exported)
    if info is None:
        raise UserError(f"{exported} has no dmdr_export.json: not a folder written by dmdr-fast's export")
    if steps is not None and "timesteps" in info.get("call_kwargs", {}):
        # An SDXL student with a noise timestep: refuse an impossible step count before the
        # teacher's (long) pass, not after it.
        from diffusers import LCMScheduler

        from dmdr_fast.models.sdxl import lcm_timesteps

        scheduler = LCMScheduler.from_pretrained(str(exported), subfolder="scheduler")
        lcm_timesteps(scheduler, int(steps), int(info["call_kwargs"]["timesteps"][0]))
    family = family_of_pipeline(teacher)
    spec = get_family(family)
    base_steps, base_w = spec.sampling_steps, spec.sampling_guidance
    t_steps = teacher_steps or base_steps
    t_w = base_w if teacher_guidance is None else float(teacher_guidance)
    shared = {k: v for k, v in info.get("call_kwargs", {}).items() if k in _SHARED_KWARGS}
    resolution = info.get("resolution") or []
    if resolution and "height" not in shared:
        shared.update(height=int(resolution[0]), width=int(resolution[1]))
    expanded = [p for p in prompts for _ in range(per_prompt)]
    bar = tqdm(total=2 * len(expanded), desc="eval", unit="img", disable=not progress)

    check_no_code(teacher, "pipeline folder")
    parts = omitted_components(teacher)  # e.g. an SD3 folder saved without T5
    pipe = DiffusionPipeline.from_pretrained(str(teacher), **parts, **load_dtype_kwargs(dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)

    def teacher_call(chunk: list[str], i: int) -> torch.Tensor:
        torch.manual_seed(seed + i)  # flow schedulers' own noise uses the global RNG
        out = pipe(
            prompt=chunk, num_inference_steps=t_steps, guidance_scale=t_w, output_type="pt",
            generator=torch.Generator(device="cpu").manual_seed(seed + i), **shared,
        )  # fmt: skip
        return torch.as_tensor(out.images).float().clamp(0, 1)

    t_img = _sample_all(teacher_call, expanded, batch, bar)
    if student is not None:  # a full student is a whole pipeline: free the teacher first
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pipe, info = load_exported(student, device=device, torch_dtype=dtype)
    else:
        pipe, info = load_exported(teacher, lora=lora, device=device, torch_dtype=dtype, pipe=pipe)
    pipe.set_progress_bar_config(disable=True)
    s_img = _sample_all(
        lambda chunk, i: sample_exported(pipe, info, chunk, steps=steps, seed=seed + i), expanded, batch, bar
    )
    bar.close()
    n_steps = steps or info.get("num_steps")
    names = (f"teacher ({t_steps} steps, guidance {t_w:g})", f"student ({n_steps} steps)")
    features = clip_features(rewards)
    real = None
    if reference_images is not None:
        real = image_folder_features(
            reference_images,
            features,
            size=(int(t_img.shape[-2]), int(t_img.shape[-1])),
            limit=reference_limit,
            batch_size=batch,
            progress=progress,
        )
    result = compare_t2i(
        {names[0]: t_img, names[1]: s_img},
        prompts,
        per_prompt=per_prompt,
        scorers=scorers_from_rewards(rewards),
        features=features,
        batch_size=batch,
        feature_name="CLIP image",
        real_features=real,
    )
    result["settings"] = {
        "family": family,
        "teacher": str(teacher),
        "student": str(exported),
        "kind": "lora" if lora is not None else "full",
        "teacher_steps": t_steps,
        "teacher_guidance": t_w,
        "student_steps": n_steps,
        "shared_kwargs": shared,
        "seed": seed,
        "prompts": prompts,
        "reference_images": str(reference_images) if reference_images is not None else None,
    }
    return result, {names[0]: t_img, names[1]: s_img}


def write_evaluation(
    out: str | os.PathLike[str], result: dict[str, Any], images: dict[str, torch.Tensor], per_prompt: int
) -> str:
    """Write :func:`evaluate_exported`'s result to ``out``: ``eval.json``, ``eval.md`` (the table)
    and ``teacher_vs_student.png``; returns the table."""
    import json

    from dmdr_fast.eval.t2i import format_comparison, save_t2i_grid

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_comparison(result)
    st = result["settings"]
    grids = {name.split(" (")[0]: x for name, x in images.items()}
    save_t2i_grid(grids, st["prompts"], per_prompt, folder / "teacher_vs_student.png")
    (folder / "eval.md").write_text(
        f"# {st['kind']} student `{st['student']}` vs teacher `{st['teacher']}` ({st['family']})\n\n"
        f"{table}\n\n![teacher vs student](teacher_vs_student.png)\n"
    )
    return table
