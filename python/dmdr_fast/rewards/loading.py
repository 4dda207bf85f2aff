"""Finding reward-model weights: a local folder/file, or a hub id when online, with errors that say what to fetch.

Reward models are never downloaded implicitly by tests; users point ``path`` at a local copy (or
at a hub id on a machine with internet access). When the weights cannot be found the error names
the model, where it is published, and the exact place to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["MissingWeightsError", "as_dtype", "hub_file", "optional_import", "resolve_local"]


class MissingWeightsError(FileNotFoundError):
    """Reward weights were not found locally (and could not be fetched)."""


def resolve_local(
    path: str | os.PathLike[str], *, what: str, source: str, expect: tuple[str, ...] = ()
) -> Path | str:
    """Return ``path`` as a local :class:`Path` if it exists, else the string (a hub id) when it looks like one.

    Args:
        path: A local file/folder, or a hub id such as ``"yuvalkirstain/PickScore_v1"``.
        what: Human name of the model, for the error (``"PickScore"``).
        source: Where to get the weights (hub id or URL), for the error.
        expect: File names that must exist inside a local folder (e.g. ``("config.json",)``).

    Raises:
        MissingWeightsError: ``path`` is neither an existing local path nor a plausible hub id, or a
            local folder lacks an expected file.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        missing = [f for f in expect if p.is_dir() and not (p / f).exists()]
        if missing:
            raise MissingWeightsError(
                f"{what}: folder {p} lacks {missing}; it should hold a copy of {source} "
                f"(e.g. `huggingface-cli download {source} --local-dir {p}` on a machine with internet)"
            )
        return p
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return text
    raise MissingWeightsError(
        f"{what}: weights not found at {p}. Download {source} on a machine with internet "
        f"(e.g. `huggingface-cli download {source} --local-dir {p}`) and copy it there, or pass the hub id"
    )


def optional_import(module: str, *, extra: str, what: str):
    """Import an optional dependency or raise ImportError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the optional package {module!r} ({exc}); install it with "
            f"`pip install 'dmdr-fast[{extra}]'`"
        ) from exc


_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype, its name (``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, ...) or ``None``.

    Raises:
        ValueError: An unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[key]


def hub_file(repo: str, filename: str, *, what: str, extra: str) -> Path:
    """Download one file of a hub repository (online only) or raise :class:`MissingWeightsError`.

    Args:
        repo: Hub id, e.g. ``"xswu/HPSv2"``.
        filename: File inside the repository.
        what: Human name of the model, for the error.
        extra: The pip extra that provides ``huggingface_hub``, for the ImportError.
    """
    hub = optional_import("huggingface_hub", extra=extra, what=what)
    try:
        return Path(hub.hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # offline, gated, missing file: all mean "fetch it yourself"
        raise MissingWeightsError(
            f"{what}: could not fetch {filename} from {repo} ({type(exc).__name__}: {exc}); download it "
            f"on a machine with internet and pass the local path"
        ) from exc
