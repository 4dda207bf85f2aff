"""Checkpoint files: atomic writes, a `latest` pointer, pruning, and trainable-state helpers.

A checkpoint is written to a temporary file in the target folder and moved into place with
``os.replace`` (atomic on POSIX), then the ``latest`` pointer is replaced the same way. A kill at
any moment therefore leaves either the previous or the new checkpoint as the latest — never a
partial file.

A checkpoint holds only tensors and plain data (numbers, strings, None, lists, dicts: what
``Trainer.state_dict`` builds, the RNG states being byte tensors), so :func:`load_checkpoint` reads
it with ``weights_only=True`` (:func:`dmdr_fast._io.load_torch_file`): loading a checkpoint from
someone else never runs code. Every checkpoint this library has written has had that form, so
none needs converting.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmdr_fast._errors import UserError
from dmdr_fast._io import UnsafeFileError, atomic_save, atomic_write_text, load_torch_file
from dmdr_fast.config import DMDRTrainerConfig

__all__ = [
    "BATCH_SPLIT",
    "FORMAT",
    "MAY_CHANGE",
    "META",
    "SHARDED_NAME",
    "CheckpointSpaceError",
    "atomic_save",
    "check_format",
    "check_resume_config",
    "config_changes",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainable_state",
    "open_checkpoint",
    "save_checkpoint",
    "trainable_state",
]

FORMAT = "dmdr_fast.checkpoint.v1"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")
#: A sharded checkpoint (train/sharded.py): a folder with DCP's files and the plain-data ``META``.
SHARDED_NAME = re.compile(r"^step_(\d{7,})$")
META = "trainer.pt"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A complete sharded checkpoint folder (``step_XXXXXXX/`` with DCP's metadata and ``META``)."""
    path = Path(path)
    return bool(SHARDED_NAME.match(path.name)) and (path / ".metadata").is_file() and (path / META).is_file()


def _complete(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, files and sharded folders, sorted."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    found += [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := SHARDED_NAME.match(p.name)) and is_sharded_checkpoint(p)
    ]
    return sorted(found)


class CheckpointSpaceError(UserError):
    """A checkpoint did not fit (disk full, quota, file size limit); the previous one is intact.

    Attributes:
        errno: ``ENOSPC``, ``EDQUOT`` or ``EFBIG``.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


#: errno → what ran out, for :class:`CheckpointSpaceError`.
_SPACE_ERRORS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EFBIG: "file size limit (ulimit -f) reached on",
}


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _space_error(exc: BaseException) -> int | None:
    """The errno of a full disk somewhere in ``exc``'s chain (torch wraps it in a RuntimeError
    "unexpected pos" that says nothing), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRORS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXXX.pt``, point ``latest`` at it, keep the newest ``keep``.

    Raises:
        CheckpointSpaceError: The disk (quota, file size limit) is full: the message says where,
            how much the checkpoint needs and how much is free; the partial file is removed and
            ``latest`` still names the previous checkpoint.
    """
    folder = Path(out_dir) / "checkpoints"
    try:
        path = atomic_save(state, folder / f"step_{step:07d}.pt")
        atomic_write_text(folder / "latest", path.name + "\n")
    except Exception as exc:
        code = _space_error(exc)
        if code is None:
            raise
        previous = latest_checkpoint(out_dir)
        kept = f"latest is still {previous.name}" if previous is not None else "no earlier checkpoint"
        raise CheckpointSpaceError(
            code,
            f"{_SPACE_ERRORS[code]} {folder} writing step_{step:07d}.pt: it needs about "
            f"{_mib(_tensor_bytes(state))}, {_mib(shutil.disk_usage(folder).free)} free ({kept}); free "
            "space there (or lower train.keep_checkpoints) and resume with --resume",
        ) from exc
    if keep > 0:
        found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
        for _, old in found[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at, else the highest-step complete file, else None."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    pointer = folder / "latest"
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if (_NAME.match(candidate.name) and candidate.is_file()) or is_sharded_checkpoint(candidate):
            return candidate
    found = _complete(folder)
    return found[-1][1] if found else None


def check_format(sd: dict[str, Any], path: str | os.PathLike[str] | None = None) -> None:
    """Raise unless ``sd`` is a dmdr_fast checkpoint of a known format (``path`` names it)."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        where = "" if path is None else f"{path} is "
        raise ValueError(f"{where}not a dmdr_fast checkpoint (format {got!r}, expected {FORMAT!r})")


#: How to get a loadable file, for the refusal message of :func:`load_checkpoint`.
_CONVERT = (
    "Checkpoints written by dmdr_fast hold only these types and load as they are, so this file was "
    "written or changed by other code; if you trust its author, load it in a separate Python session, "
    "turn every value into one of these types and torch.save the result, then load that file."
)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without running code, and check its format.

    Raises:
        dmdr_fast._io.UnsafeFileError: If the file holds objects beyond tensors and plain data.
        ValueError: If it is not a dmdr_fast checkpoint of a known format.
    """
    sd = load_torch_file(path, map_location="cpu", convert=_CONVERT)
    check_format(sd, path)
    return sd


def open_checkpoint(path: str | os.PathLike[str], what: str = "--checkpoint") -> dict[str, Any]:
    """:func:`load_checkpoint` of a path a user gave: each way it can be wrong is one line.

    Args:
        path: The checkpoint file.
        what: The argument that named it, for the message.

    Raises:
        UserError: Missing, a folder (the message names the latest checkpoint under it, if any),
            empty, unreadable, truncated or damaged, or not a dmdr_fast checkpoint. A sharded
            checkpoint folder gives its plain-data part (load its tensors with ``Trainer.resume``).
        dmdr_fast._io.UnsafeFileError: As :func:`load_checkpoint`.
    """
    file = Path(path)
    if not file.exists():
        raise UserError(f"{what} {file}: no such file")
    if file.is_dir() and is_sharded_checkpoint(file):  # its trainer.pt: config, counters (no tensors)
        return load_checkpoint(file / META)
    if file.is_dir():
        # A run folder or its checkpoints/ folder: point at the file that was probably meant.
        inner = latest_checkpoint(file) or (
            latest_checkpoint(file.parent) if file.name == "checkpoints" else None
        )
        hint = f"; its latest checkpoint is {inner}" if inner is not None else ""
        raise UserError(f"{what} {file}: is a folder, not a checkpoint file{hint}")
    if file.stat().st_size == 0:
        raise UserError(f"{what} {file}: is empty (0 bytes), not a checkpoint")
    try:
        return load_checkpoint(file)
    except UnsafeFileError:
        raise
    except OSError as err:
        raise UserError(f"{what} {file}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:  # torch's reasons can span lines: the first says enough
        reason = str(err).strip().splitlines()[0]
        if "not a dmdr_fast checkpoint" not in reason:
            reason = f"not a complete torch file (truncated or damaged?): {reason}"
        raise UserError(f"{what} {file}: {reason}") from None


def trainable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (a full student, or just its LoRA), detached copies on CPU."""
    return {n: p.detach().cpu().clone() for n, p in network.named_parameters() if p.requires_grad}


def load_trainable_state(network: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` into ``network``'s trainable parameters; the key sets must match exactly."""
    params = {n: p for n, p in network.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it written with another student/critic kind or LoRA targets?)"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(
                    f"checkpoint {what}.{n} has shape {tuple(state[n].shape)}, model {tuple(p.shape)}"
                )
            p.copy_(state[n])


#: Config fields a resumed run may change: how long it runs; when it logs, samples, evaluates and
#: checkpoints; what it watches (the monitor); where and how it computes the same maths (device,
#: kernels, attention, compile, checkpointing, sharding, VAE slicing/tiling); where its files are
#: (model.path, data.cache). Anything else changes the training and is refused (``*``: a prefix),
#: except the batch split: see :data:`BATCH_SPLIT`.
MAY_CHANGE = (
    "name", "model.path", "model.gradient_checkpointing", "model.vae_slicing", "model.vae_tiling",
    "data.cache", "data.offload_text_encoders", "data.eval_prompts", "student.init", "monitor.*",
    "train.max_steps", "train.log_every", "train.sample_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.num_eval_samples",
    "train.num_grid_samples", "train.tensorboard", "train.device", "train.deterministic",
    "train.parallel", "train.compile", "train.compile_backend", "train.compile_mode",
    "train.attention", "train.kernel_backend",
)  # fmt: skip
#: How the global batch (world size × ``train.batch_size`` × ``train.grad_accum``) is split may
#: change — a run saved on 2 processes resumes on 1 with 2 micro-batches, or on 4 with half the
#: batch each (resharding) — as long as the global batch itself stays the same.
BATCH_SPLIT = ("train.batch_size", "train.grad_accum")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:  # a value, or an empty section (kept as a value)
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for each field of two config dicts (``to_dict()``) that
    differs and may not change on resume (:data:`MAY_CHANGE`); nested dicts (``model.kwargs``) are
    compared field by field."""
    old, new = _flat(saved), _flat(current)

    def may_change(key: str) -> bool:
        return key in BATCH_SPLIT or any(
            key == f or (f.endswith("*") and key.startswith(f[:-1])) for f in MAY_CHANGE
        )

    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and not may_change(k)]


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], path: object, *, saved_world: int, world: int
) -> None:
    """Refuse to resume ``path`` (saved with config ``saved`` by ``saved_world`` processes) under a
    config that changes the training, or another global batch; the message names each field."""
    # The saved config as this version reads it (fields added since take their defaults); an older
    # layout that no longer parses is compared as it is.
    with contextlib.suppress(Exception):
        saved = DMDRTrainerConfig.from_dict(saved).to_dict()
    shown = [f"{k}: {old!r} -> {new!r}" for k, old, new in config_changes(saved, current)]

    def split(cfg: dict[str, Any], n: int) -> tuple[int, str]:
        b, k = int(cfg["train"]["batch_size"]), int(cfg["train"].get("grad_accum", 1))
        return n * b * k, f"{n} x {b} x {k}"

    (before, was), (after, now) = split(saved, saved_world), split(current, world)
    if before != after:
        shown.insert(
            0,
            f"global batch (processes x train.batch_size x train.grad_accum): {was} = {before} -> {now} = {after}",
        )
    if shown:
        more = f" (and {len(shown) - 8} more)" if len(shown) > 8 else ""
        raise UserError(
            f"{path} was trained with another config: {'; '.join(shown[:8])}{more}. Resume with the "
            "same settings (only when and how the run logs, evaluates, checkpoints and computes may "
            "change, and how the global batch is split), or start a new run (--overwrite, or another --out)"
        )
