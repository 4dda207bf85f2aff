"""Load a network's full weights from a file or a diffusers folder (``student.init``).

A user starting DMDR from an already distilled network — DMD2's ODE-pretrained SDXL UNet for the
paper's SDXL recipe, or an earlier full export of ours — has its weights in one of these forms:

- a single file: ``.safetensors``, or a pickled state dict (``.bin`` / ``.pt`` / ``.pth`` /
  ``.ckpt``, read with ``weights_only=True``; a ``{"state_dict": ...}`` or ``{"model": ...}``
  wrapper is unwrapped);
- a diffusers model folder (``config.json`` + ``diffusion_pytorch_model[.safetensors|.bin]``, or
  sharded with an ``*.index.json``);
- a diffusers pipeline folder (``model_index.json``): the component named ``subfolder`` is read.

Keys may carry the component prefix (``unet.``) or DDP's ``module.``; both are stripped. Loading
is strict: every key of the network must be present with its shape (a partial load would silently
mix two models), and keys the network lacks are an error too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dmdr_fast._io import RESAVE_TENSORS, load_safetensors, load_torch_file

__all__ = ["load_network_weights", "read_state_dict"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return load_safetensors(file)
    if file.suffix in _PICKLE_SUFFIXES:
        state = load_torch_file(file, map_location="cpu", convert=RESAVE_TENSORS)
        for key in _WRAPPER_KEYS:  # training checkpoints often nest the weights one level down
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{file} does not hold a state dict (a mapping of names to tensors)")
        return state
    raise ValueError(
        f"unsupported weights file {file.name!r}: use .safetensors or a torch state dict "
        f"({', '.join(_PICKLE_SUFFIXES)})"
    )


_STANDARD_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file stems


def _files_of_folder(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder (one file, or the shards of an index).

    The standard full-precision names win over variants (``*.fp16.*``); a folder holding only
    several variants is ambiguous and refused rather than loaded at a guessed precision.
    """

    def shards_of(index: Path) -> list[Path]:
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]

    for stem in _STANDARD_NAMES:
        for suffix in (".safetensors", ".bin"):
            if (folder / f"{stem}{suffix}.index.json").is_file():
                return shards_of(folder / f"{stem}{suffix}.index.json")
            if (folder / f"{stem}{suffix}").is_file():
                return [folder / f"{stem}{suffix}"]
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return shards_of(indexes[0])
    candidates = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES
    )
    if len(candidates) == 1:
        return candidates
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"cannot tell which weights file of {folder} to load (found {found[:10]}); pass the file itself"
    )


def read_state_dict(path: str | os.PathLike[str], *, subfolder: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a file, a diffusers model folder or a pipeline folder (CPU tensors).

    Args:
        path: The file or folder.
        subfolder: The component to read from a pipeline folder (``"unet"``, ``"transformer"``);
            also the key prefix stripped when every key has it.

    Returns:
        Names → tensors, prefixes stripped.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If no weights can be found or the file holds something else.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            if subfolder is None or not (path / subfolder).is_dir():
                raise ValueError(f"{path} is a pipeline folder without a {subfolder!r} component")
            path = path / subfolder
        state: dict[str, torch.Tensor] = {}
        for file in _files_of_folder(path):
            state.update(_read_file(file))
    else:
        state = _read_file(path)
    for prefix in (f"{subfolder}." if subfolder else None, "module."):
        if prefix and state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


@torch.no_grad()
def load_network_weights(
    network: nn.Module, path: str | os.PathLike[str], *, subfolder: str | None = None
) -> int:
    """Copy a full set of weights into ``network`` (in place, keeping its dtype and device).

    Args:
        network: The network to overwrite (e.g. the student's UNet copy).
        path: See :func:`read_state_dict`.
        subfolder: See :func:`read_state_dict`.

    Returns:
        The number of tensors loaded.

    Raises:
        ValueError: If keys are missing or unexpected, or a shape differs (the message names them).
    """
    state = read_state_dict(path, subfolder=subfolder)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the {type(network).__name__}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]} (a different architecture or config?)"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{path} does not fit the {type(network).__name__}: shapes differ: {wrong[:5]}")
    for key, target in own.items():
        target.copy_(state[key].to(device=target.device, dtype=target.dtype))
    return len(own)
