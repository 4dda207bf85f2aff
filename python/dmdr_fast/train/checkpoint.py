"""Checkpoint files: atomic writes, a `latest` pointer, pruning, and trainable-state helpers.

A checkpoint is written to a temporary file in the target folder and moved into place with
``os.replace`` (atomic on POSIX), then the ``latest`` pointer is replaced the same way. A kill at
any moment therefore leaves either the previous or the new checkpoint as the latest — never a
partial file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmdr_fast._io import atomic_save, atomic_write_text

__all__ = [
    "FORMAT",
    "atomic_save",
    "check_format",
    "latest_checkpoint",
    "load_trainable_state",
    "save_checkpoint",
    "trainable_state",
]

FORMAT = "dmdr_fast.checkpoint.v1"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXXX.pt``, point ``latest`` at it, keep the newest ``keep``."""
    folder = Path(out_dir) / "checkpoints"
    path = atomic_save(state, folder / f"step_{step:07d}.pt")
    atomic_write_text(folder / "latest", path.name + "\n")
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
        if _NAME.match(candidate.name) and candidate.is_file():
            return candidate
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def check_format(sd: dict[str, Any]) -> None:
    """Raise unless ``sd`` is a dmdr_fast checkpoint of a known format."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"not a dmdr_fast checkpoint (format {got!r}, expected {FORMAT!r})")


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
