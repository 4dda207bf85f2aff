"""Atomic file writes shared by checkpoints, cached teachers and classifiers, the progress record
that lets sharded builds (prompt cache, ODE pairs) continue after an interruption, and the one
reader of torch (pickle) files, which never runs code found in them, with the check that keeps
a shared model folder's Python files from being imported."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PROGRESS_NAME",
    "RESAVE_TENSORS",
    "UnsafeFileError",
    "atomic_save",
    "atomic_write_text",
    "check_no_code",
    "load_safetensors",
    "load_torch_file",
    "omitted_components",
    "open_safetensors",
    "read_progress",
    "write_progress",
]


def _umask_mode() -> int:
    """The permission bits ``open()`` would give a new file: 0666 less the process umask."""
    try:  # Linux names the umask without changing it (os.umask can only set it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` through a temporary file in the same folder, fsync, ``os.replace``.

    A reader (or a process killed mid-write) sees either the old file or the complete new one.
    The file gets the permissions of any other new file (the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Write a small text file atomically (same scheme as :func:`atomic_save`), UTF-8.

    Args:
        path: destination (its folder must exist).
        text: the content.
        mode: permission bits of the file (default: those of any new file, from the umask).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: The progress record inside a ``<out>.tmp`` build folder (removed when the build completes).
PROGRESS_NAME = "progress.json"


def write_progress(
    folder: Path, identity: dict[str, Any], shards: list[dict[str, Any]], **extra: Any
) -> None:
    """Record the complete shards of a build in ``folder`` (call after each shard file is written:
    a crash in between costs only that shard again)."""
    state = {"identity": identity, "shards": shards, **extra}
    atomic_write_text(folder / PROGRESS_NAME, json.dumps(state) + "\n")


def read_progress(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record of an interrupted build in ``folder`` made with ``identity`` (every
    recorded shard file present), else None: nothing to continue, start afresh."""
    try:
        state = json.loads((folder / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None
    shards = state.get("shards") or []
    if state.get("identity") != identity or not all((folder / s["file"]).is_file() for s in shards):
        return None
    return state


class UnsafeFileError(ValueError):
    """A torch file that holds more than plain data, refused unread (see :func:`load_torch_file`)."""


#: What ``weights_only`` unpickling builds, for the refusal message.
_SAFE_CONTENT = "tensors, numbers, strings, None, lists, tuples and dicts"
#: The usual way out for a weights file that :func:`load_torch_file` refuses.
RESAVE_TENSORS = (
    "If you trust its author, convert it once in a separate Python session: load it there with a "
    "full (not weights-only) torch.load, keep only its tensors, save them with safetensors.torch.save_file "
    "(or torch.save a dict of tensors), then use the new file."
)
_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _refusal(message: str) -> str:
    """Why torch's ``weights_only`` unpickler stopped, as the middle of our message."""
    found = _REASON.search(message)
    reason = found.group(1).strip().rstrip(".") if found else "an unsupported pickle instruction"
    name = _GLOBAL.match(reason)
    if name:
        return (
            f"it holds Python objects other than {_SAFE_CONTENT} (the global {name.group(1)}), and "
            "unpickling them would run whatever code the file's author chose"
        )
    return (
        f"it is not a file of {_SAFE_CONTENT} that torch.load(weights_only=True) can read ({reason}); "
        "a full unpickling of it could run code, so it is not attempted"
    )


def load_torch_file(path: str | os.PathLike[str], *, map_location: Any = "cpu", convert: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: a file from someone else can never run code here.

    Students, checkpoints and reward weights are shared between people, and a full unpickling
    runs whatever callable the file's author put in it; the restricted unpickler builds only plain
    data and tensors, which is all the files this library writes hold. Every torch file the package
    reads goes through this function, so one place decides what a file may contain.

    Args:
        path: The file.
        map_location: Where the tensors go (``torch.load``'s argument).
        convert: How to turn such a file into one that loads, for the message (a sentence or two).

    Returns:
        The loaded object.

    Raises:
        UnsafeFileError: If the file holds other Python objects or pickle instructions (none of
            them was run); the message names the file, what was refused and how to convert it.
        ValueError: If torch cannot read it otherwise (damaged, another format; the message names it).
    """
    try:
        return torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # `from None`: torch's own message is long and advises turning weights_only off, the very thing
        # refused here; what it refused is all of it that matters.
        raise UnsafeFileError(
            f"refused to load {os.fspath(path)}: {_refusal(str(err))}. Nothing in it was run: "
            f"dmdr_fast reads torch files with weights_only=True only (README, 'Loading files from "
            f"others'). {convert}".rstrip()
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:  # truncated zip, text, ...
        raise ValueError(
            f"could not read {os.fspath(path)} as a torch file ({type(err).__name__}: {err})"
        ) from err


def check_no_code(folder: str | os.PathLike[str], what: str = "model folder") -> None:
    """Refuse a local diffusers/transformers folder that ships Python files.

    diffusers imports a pipeline's or a component's own ``.py`` file when ``model_index.json``
    names it (recent versions only with ``trust_remote_code=True``, which dmdr_fast never passes,
    older ones may not ask); the families this library supports need no such file, so a folder
    that has one is refused before anything reads it. A hub id (not a local folder) is left to
    the libraries' own ``trust_remote_code`` rule.

    Raises:
        UnsafeFileError: If ``folder`` or one of its subfolders holds a ``.py`` file.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    found = sorted(p.relative_to(root).as_posix() for p in [*root.glob("*.py"), *root.glob("*/*.py")])
    if found:
        raise UnsafeFileError(
            f"refused to load {what} {root}: it ships Python code ({', '.join(found[:5])}), which "
            "diffusers would import and run; dmdr_fast loads only folders of configs and weights. "
            "If you trust its author and need that code, load the pipeline yourself and pass the "
            "objects in (e.g. TextToImageAdapter.from_pipeline)."
        )


def omitted_components(folder: str | os.PathLike[str]) -> dict[str, None]:
    """The components a pipeline folder was saved without, as ``from_pretrained`` keyword arguments.

    ``save_pretrained`` writes an omitted optional part (SD3 without T5: ``text_encoder_3=None``)
    as ``[null, null]`` in ``model_index.json``, but ``from_pretrained`` then refuses the folder
    unless each such part is passed as ``None`` again; this returns exactly those (``{}`` for a
    hub id, a folder without ``model_index.json`` or one that omits nothing).
    """
    index = Path(folder) / "model_index.json"
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    return {
        name: None
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and value and all(v is None for v in value)
    }


def open_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> Any:
    """``safetensors.safe_open`` (memory-mapped, lazy), naming the file when it is not one.

    A safetensors file is a JSON header and raw tensor bytes: reading it can run no code. A file
    of another format put in its place (a renamed pickle) fails the header check; the error then
    says which file it was.

    Raises:
        ValueError: If ``path`` is not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(os.fspath(path), framework="pt", device=device)
    except SafetensorError as err:
        raise ValueError(
            f"{os.fspath(path)} is not a safetensors file ({err}); nothing in it was run"
        ) from err


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see :func:`open_safetensors`), by name.

    Raises:
        ValueError: If ``path`` is not a safetensors file.
    """
    with open_safetensors(path, device) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
