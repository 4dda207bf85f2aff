"""Export a trained text-to-image student so that plain diffusers samples it, and sample it back.

Two formats, chosen by how the student was trained (``student.kind``):

- **full fine-tune** → a complete diffusers pipeline folder (``pipe.save_pretrained``): the
  student's denoiser (EMA weights if any, diffusers' own attention) in place of the teacher's, the
  teacher's VAE, text encoders and tokenizers, and the exported few-step scheduler;
- **LoRA** → ``pytorch_lora_weights.safetensors`` (+ ``adapter_config.json``) that
  ``pipe.load_lora_weights(folder)`` reads on top of the teacher pipeline, and the few-step
  scheduler in ``scheduler/`` (``pipe.scheduler = <SchedulerClass>.from_pretrained(folder,
  subfolder="scheduler")``).

Both also get ``dmdr_export.json``: the family, the number of steps, the keyword arguments to call
the pipeline with (no CFG: the guidance is distilled into the student) and the teacher's folder.
The scheduler is the adapter's :meth:`~dmdr_fast.models.t2i.TextToImageAdapter.export_scheduler`,
and the Trainer trained the student on exactly the grid it visits
(:meth:`~dmdr_fast.models.t2i.TextToImageAdapter.few_step_grid`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dmdr_fast._dtypes import load_dtype_kwargs, torch_dtype
from dmdr_fast._errors import UserError
from dmdr_fast._io import atomic_write_text, check_no_code, omitted_components

if TYPE_CHECKING:
    from diffusers import ModelMixin

    from dmdr_fast.models.t2i import TextToImageAdapter
    from dmdr_fast.train.trainer import Trainer

__all__ = [
    "EXPORT_INFO_NAME",
    "check_exported",
    "export_student",
    "load_exported",
    "read_export_info",
    "sample_exported",
]

EXPORT_INFO_NAME = "dmdr_export.json"


def export_student(
    trainer: Trainer, out_dir: str | os.PathLike[str], *, base_path: str | None = None
) -> Path:
    """Write the trainer's student as a diffusers pipeline folder (full) or LoRA folder (LoRA).

    Args:
        trainer: A Trainer whose student is a text-to-image adapter.
        out_dir: Output folder (created).
        base_path: The teacher's pipeline folder; default ``config.model.path``. A full export
            reloads the other components from it when the adapter no longer holds them (text
            encoders dropped after caching prompts).

    Returns:
        ``out_dir``.

    Under FSDP (``train.parallel: fsdp`` on several ranks) every rank calls it: the student's
    shards are gathered once, onto rank 0's CPU (:func:`~dmdr_fast.train.parallel.gathered_weights`),
    and rank 0 alone writes.
    """
    from dmdr_fast.models.lora_io import save_lora
    from dmdr_fast.train.parallel import gathered_weights, is_sharded

    config = trainer.config
    if not hasattr(trainer.student, "export_scheduler"):
        raise ValueError(
            f"{type(trainer.student).__name__} is not a text-to-image adapter: nothing to export to diffusers"
        )
    student = cast("TextToImageAdapter", trainer.student)  # what the check above admits
    sharded = is_sharded(student.network)
    writer = not sharded or trainer.rank == 0
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    n, shift = config.student.num_steps, config.student.shift
    scheduler = student.export_scheduler(n, shift)
    base_path = base_path if base_path is not None else config.model.path
    dtype = torch_dtype(config.model.load_dtype)
    full_pipeline = base_path is not None and (Path(base_path) / "model_index.json").is_file()
    if config.student.kind == "lora":
        with trainer.ema_weights(), gathered_weights(student.network):
            if writer:
                save_lora(student.network, out, adapter="student", prefix=student.lora_prefix)
                scheduler.save_pretrained(out / "scheduler")
        kind = "lora"
    elif full_pipeline:
        # Big models: no second copy on the GPU. The teacher folder's other components are copied
        # file by file, and the student's weights are written tensor by tensor from the live network.
        assert base_path is not None
        if writer:
            _copy_components(Path(base_path), out, skip={student.network_attr, "scheduler"})
            _patch_model_index(out, scheduler)
            scheduler.save_pretrained(out / "scheduler")
        with trainer.ema_weights(), gathered_weights(student.network):
            if writer:
                _save_network(student.network, out / student.network_attr, dtype)
        kind = "pipeline"
    elif sharded:
        raise UserError(
            "under FSDP a full student exports next to its teacher's pipeline folder: set model.path "
            "to a diffusers folder (this adapter was built from an in-memory pipeline)"
        )
    else:  # an adapter built from an in-memory pipeline: assemble and save the pipeline object
        network = trainer.export_student().to(dtype)  # EMA weights, native attention, own copy
        pipe = _assemble(student, network, scheduler, base_path, dtype)
        pipe.save_pretrained(out)
        kind = "pipeline"
    if not writer:
        return out
    info = {
        "format": 1,
        "kind": kind,
        "family": student.family,
        "pipeline_class": type(student.pipeline).__name__ if student.pipeline is not None else None,
        "num_steps": n,
        "shift": shift,
        "scheduler_class": type(scheduler).__name__,
        "call_kwargs": {**student.pipeline_call_kwargs(n), **_size_kwargs(student)},
        "noise_timestep": getattr(student, "noise_timestep", None),
        "resolution": list(getattr(student, "resolution", ()) or ()),
        "base_pipeline": base_path,
        "lora_prefix": student.lora_prefix if kind == "lora" else None,
        "trained_steps": trainer.state.gen_step,
    }
    atomic_write_text(out / EXPORT_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return out


def _copy_components(base: Path, out: Path, skip: set[str]) -> None:
    """Copy the teacher folder's components (text encoders, tokenizers, VAE, ...) except ``skip``."""
    for item in base.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_dir():  # hard links where possible: multi-GB text encoders cost no disk twice
            shutil.copytree(item, out / item.name, dirs_exist_ok=True, copy_function=_link_or_copy)
        elif item.name == "model_index.json":
            shutil.copy2(item, out / item.name)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _patch_model_index(out: Path, scheduler: Any) -> None:
    """Point ``model_index.json``'s scheduler entry at the exported scheduler's class."""
    index = json.loads((out / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def _save_network(network: ModelMixin, folder: Path, dtype: torch.dtype | None) -> None:
    """``save_pretrained`` layout of ``network`` (config + safetensors), cast to ``dtype`` on the CPU.

    Only the state dict matters (attention processors are not saved), so the live network is
    written as is; each tensor is copied to the CPU once, never a whole second network on the GPU.
    """
    from safetensors.torch import save_file

    from dmdr_fast.models.lora import merged_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    network.save_config(str(folder))
    # merged_state_dict: the plain module names (LoRA wrappers folded; a full student has none).
    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in merged_state_dict(network).items()
    }
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def _size_kwargs(student: Any) -> dict[str, int]:
    """``height``/``width`` of the training resolution (pipelines default to the model's native size)."""
    resolution = getattr(student, "resolution", None)
    return {"height": int(resolution[0]), "width": int(resolution[1])} if resolution else {}


def _assemble(
    student: Any, network: torch.nn.Module, scheduler: Any, base_path: str | None, dtype: torch.dtype | None
):
    """The teacher pipeline's components with the student's denoiser and the few-step scheduler."""
    pipe = student.pipeline
    if pipe is not None and student.can_encode:
        components = dict(pipe.components)
        components[student.network_attr] = network
        components["scheduler"] = scheduler
        # Constructor flags stored in the pipeline config (e.g. SDXL's force_zeros_for_empty_prompt)
        # must survive the rebuild: they change how the exported pipeline encodes empty prompts.
        accepted = inspect.signature(type(pipe).__init__).parameters
        flags = {k: v for k, v in pipe.config.items() if k in accepted and k not in components}
        return type(pipe)(**components, **flags)
    if base_path is None:
        raise ValueError(
            "the adapter no longer holds the text encoders (dropped after caching prompts) and no "
            "base pipeline folder is known: pass base_path (the teacher's folder)"
        )
    cls = type(pipe) if pipe is not None else None
    if cls is None:
        from diffusers import DiffusionPipeline

        cls = DiffusionPipeline
    overrides = {student.network_attr: network, "scheduler": scheduler}
    check_no_code(base_path, "pipeline folder")
    parts = {**omitted_components(base_path), **overrides}  # parts saved as None stay None
    return cls.from_pretrained(base_path, **load_dtype_kwargs(dtype), **parts)


#: ``org/name``: what a missing local path may instead be (diffusers then asks the hub).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_folder(path: str | os.PathLike[str], what: str, needs: str, kind: str) -> bool:
    """``path`` as a local folder holding ``needs`` (a glob); False for what can only be a hub id."""
    folder = Path(path)
    if not folder.exists():
        text = os.fspath(path)
        if _HUB_ID.match(text) and not folder.parent.is_dir():
            return False  # not a local path: left to diffusers' hub lookup
        raise UserError(f"{what} {folder}: no such folder; give {kind}")
    if not folder.is_dir():
        raise UserError(f"{what} {folder}: is a file; give {kind}")
    if not any(folder.glob(needs)):
        raise UserError(f"{what} {folder}: not {kind} (no {needs} in it)")
    return True


def _family_of(folder: str | os.PathLike[str]) -> str | None:
    from dmdr_fast.models.families import family_of_pipeline

    try:
        return family_of_pipeline(folder)
    except ValueError:  # another pipeline class: diffusers may still load it
        return None


def check_exported(
    pipeline: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    what: tuple[str, str] = ("--pipeline", "--lora"),
) -> None:
    """Refuse a missing or wrong pipeline / LoRA folder before anything is loaded.

    Args:
        pipeline: The pipeline folder (or a hub id ``org/name``, left unchecked).
        lora: An exported LoRA folder to go onto ``pipeline``.
        what: The arguments that named them, for the messages.

    Raises:
        UserError: A folder that does not exist, is a file, lacks ``model_index.json`` (pipeline)
            or ``*.safetensors`` (LoRA), or a LoRA exported for another family than the pipeline's.
    """
    local = _check_folder(pipeline, what[0], "model_index.json", "a diffusers pipeline folder")
    if lora is None:
        return
    _check_folder(lora, what[1], "*.safetensors", "an exported LoRA folder")
    trained_for = (read_export_info(lora) or {}).get("family")
    family = _family_of(pipeline) if local else None
    if trained_for and family and trained_for != family:
        raise UserError(
            f"{what[1]} {lora} was trained on a {trained_for} pipeline (its {EXPORT_INFO_NAME}), but "
            f"{what[0]} {pipeline} is a {family} pipeline; give the {trained_for} teacher it was trained on"
        )


def read_export_info(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``dmdr_export.json`` of an exported folder, or ``None`` if it has none."""
    path = Path(folder) / EXPORT_INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def load_exported(
    pipeline: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    pipe: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Load an exported student with plain diffusers.

    Args:
        pipeline: A pipeline folder: an exported full student, or the teacher when ``lora`` is given.
        lora: An exported LoRA folder (its weights are loaded with ``pipe.load_lora_weights`` and
            its few-step scheduler replaces the pipeline's).
        device: Where to put the pipeline.
        torch_dtype: Load dtype (default: as saved).
        pipe: An already loaded ``pipeline`` to use instead of loading it again (with ``lora``:
            the teacher pipeline the LoRA goes onto; its scheduler is replaced).

    Returns:
        ``(pipe, info)``: the diffusers pipeline and the export info (``{}`` for a folder exported by
        something else; the call then uses the pipeline's defaults).

    Raises:
        UserError: See :func:`check_exported` (when ``pipe`` is not given).
    """
    from diffusers import DiffusionPipeline

    if pipe is None:  # a loaded ``pipe`` comes from a caller that checked (evaluate_exported)
        check_exported(pipeline, lora=lora)
        check_no_code(pipeline, "pipeline folder")  # a shared folder's .py files are never imported
        # Parts the folder was saved without (SD3 without T5) are passed as None, as diffusers needs.
        parts = omitted_components(pipeline)
        pipe = DiffusionPipeline.from_pretrained(str(pipeline), **parts, **load_dtype_kwargs(torch_dtype))
    info = read_export_info(pipeline) or {}
    if lora is not None:
        check_no_code(lora, "LoRA folder")
        lora_info = read_export_info(lora) or {}
        pipe.load_lora_weights(str(lora))
        if (Path(lora) / "scheduler").is_dir():
            import diffusers

            name = lora_info.get("scheduler_class")
            cls: Any = getattr(diffusers, name, None) if name else type(pipe.scheduler)
            # The name comes from the shared folder's JSON: only a diffusers scheduler is built.
            is_scheduler = inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)
            if not is_scheduler:
                raise ValueError(
                    f"{lora}: {EXPORT_INFO_NAME} names {name!r}, not a diffusers scheduler class"
                )
            pipe.scheduler = cls.from_pretrained(str(lora), subfolder="scheduler")
        info = lora_info or info
    return pipe.to(device), info


@torch.no_grad()
def sample_exported(
    pipe: Any,
    info: dict[str, Any],
    prompts: list[str],
    *,
    steps: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` from a loaded exported pipeline (one call, one prompt each).

    ``steps`` overrides the exported step count (the scheduler then spaces that many steps with
    the same shift; an SDXL student keeps its noise timestep as the first); the other call
    arguments come from ``info['call_kwargs']``.
    """
    if steps is not None and int(steps) < 1:  # 0 must not mean "the default" (or crash in diffusers)
        raise ValueError(f"steps must be >= 1 (or None for the exported count), got {steps}")
    kwargs = dict(info.get("call_kwargs", {}))
    if steps is not None and "timesteps" in kwargs:
        # An SDXL student with a noise timestep (DMD2's 399): N LCM steps that still start there.
        from dmdr_fast.models.sdxl import lcm_timesteps

        kwargs["timesteps"] = lcm_timesteps(pipe.scheduler, int(steps), int(kwargs["timesteps"][0]))
    elif steps is not None:
        kwargs["num_inference_steps"] = int(steps)
    resolution = info.get("resolution") or []
    if height is None and resolution:
        height, width = int(resolution[0]), int(resolution[1])
    if height is not None:
        kwargs.update(height=height, width=width if width is not None else height)
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # The flow pipelines call scheduler.step without the generator: multi-step re-noising draws
    # from the global RNG, so seed it too for reproducible samples.
    torch.manual_seed(seed)
    quiet: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if "timesteps" in kwargs:  # a noise-timestep student starts below 999 on purpose
        from dmdr_fast.models.sdxl import expected_noise_timestep

        quiet = expected_noise_timestep()
    with quiet:
        out = pipe(prompt=list(prompts), generator=generator, output_type="pt", **kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    return torch.as_tensor(images).float().clamp(0, 1).to(device)
