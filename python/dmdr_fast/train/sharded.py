"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes its shards.

Under ``train.parallel: fsdp`` a checkpoint is a folder ``checkpoints/step_XXXXXXX/``:

- DCP's shard files and ``.metadata`` hold the *tensors*: the student's and critic's trainable
  parameters, the optimisers' moments (keyed by parameter name, so any world size can read them)
  and the EMA; every rank writes the part it owns, in parallel;
- ``trainer.pt`` (rank 0, a plain-data file read with ``weights_only``) holds everything else:
  counters, RNG streams, history, monitor, the optimisers' hyper-parameters, the config.

**Visible only when complete.** The ranks write into ``.step_XXXXXXX.partial/``; when DCP has
written its metadata (after every rank's shards) and rank 0 its ``trainer.pt``, rank 0 renames
the folder into place and then replaces the ``latest`` pointer, both atomic on POSIX: a kill at any
moment leaves the previous checkpoint as the latest.

**Resharding.** DCP stores each tensor's global shape and the offsets of its shards, and loading
reads into whatever the destination holds: a run saved on 2 processes resumes on 1 (plain tensors,
no process group) or on 4 (4 shards each). :func:`load_into` fills the live tensors in place.

**Safety.** DCP reads ``.metadata`` with a full unpickler; a checkpoint from someone else could run
code. :func:`check_metadata` first unpickles it with an allow-list of DCP's own metadata classes,
and only then is it handed to DCP (its shard data is read with ``weights_only``).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from dmdr_fast._io import UnsafeFileError, atomic_save, atomic_write_text, load_torch_file
from dmdr_fast.train.checkpoint import META, SHARDED_NAME, check_format, is_sharded_checkpoint

__all__ = [
    "META",
    "check_metadata",
    "checkpoint_parts",
    "is_sharded_checkpoint",
    "live_tensors",
    "load_into",
    "resume_into",
    "save_sharded",
]


#: Modules whose classes a DCP ``.metadata`` pickle may name (its dataclasses), and torch types.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"),  # the storage metadata records the folder it was written to
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise UnsafeFileError(
            f"DCP metadata names {module}.{name}, which a checkpoint's metadata never holds"
        )


def check_metadata(path: Path) -> None:
    """Unpickle ``path/.metadata`` with the allow-list; raise :class:`UnsafeFileError` otherwise."""
    with open(Path(path) / ".metadata", "rb") as f:
        _MetadataUnpickler(io.BytesIO(f.read())).load()


def _osd(network: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(network, opt)


def live_tensors(trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, param_groups)`` of a Trainer: the live parameters (detached views: a DCP load
    writes into them), the optimiser moments keyed by parameter name, the EMA; and the optimisers'
    hyper-parameters, which go to ``trainer.pt`` (not pickled into DCP's files)."""
    owner = trainer.critic if trainer.critic is not None else trainer.guidance
    tensors: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for key, network, opt in (
        ("student", trainer.student.network, trainer.opt_g),
        ("critic", owner.network, trainer.opt_c),
    ):
        tensors[key] = {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}
        osd = _osd(network, opt)
        tensors[f"opt_{key}"] = osd["state"]
        groups[f"opt_{key}"] = osd["param_groups"]
    if trainer.ema is not None:
        tensors["ema"] = trainer.ema
    return tensors, groups


def checkpoint_parts(trainer: Any, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors for DCP, trainer.pt's content)`` of a Trainer, from its ``trainer_io.meta()`` plain
    part: the tensors of :func:`live_tensors`, plus GRPO's KL reference weights (sharded like the
    student's), which leave the plain part."""
    tensors, groups = live_tensors(trainer)
    rl = meta.get("rl")
    if rl is not None and rl.get("reference") is not None:
        tensors["rl_reference"] = rl["reference"]
        meta = {**meta, "rl": {**rl, "reference": None}}
    return tensors, {**meta, "param_groups": groups, "sharded_keys": sorted(tensors)}


def save_sharded(
    out_dir: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any] | None, keep: int
) -> Path:
    """Write ``out_dir/checkpoints/step_XXXXXXX/`` from every rank; ``meta`` on rank 0 (else None).

    Every rank must call it (DCP's save is a collective). Returns the folder.
    """
    import torch.distributed.checkpoint as dcp

    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    rank0 = not on or dist.get_rank() == 0
    folder = Path(out_dir) / "checkpoints"
    final, partial = folder / f"step_{step:07d}", folder / f".step_{step:07d}.partial"
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a previous attempt killed mid-write
    if on:
        dist.barrier()
    dcp.save(tensors, checkpoint_id=str(partial))  # returns once the metadata is written
    if rank0:
        assert meta is not None
        atomic_save(meta, partial / META)
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(folder / "latest", final.name + "\n")
        _prune(folder, keep, final)
    if on:
        dist.barrier()
    return final


def _prune(folder: Path, keep: int, current: Path) -> None:
    if keep <= 0:
        return
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := SHARDED_NAME.match(p.name)) and p.is_dir()
    )
    for _, old in found[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def load_into(path: Path, tensors: dict[str, Any], convert: str = "") -> dict[str, Any]:
    """Fill ``tensors`` (from :func:`live_tensors`) in place from the checkpoint folder ``path``
    (any world size, also without a process group) and return its ``trainer.pt``.

    Raises:
        UnsafeFileError: ``.metadata`` names classes beyond DCP's metadata, or ``trainer.pt``
            objects beyond plain data.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = load_torch_file(path / META, map_location="cpu", convert=convert)
    check_metadata(path)
    wanted = {k: v for k, v in tensors.items() if k in meta.get("sharded_keys", tensors.keys())}
    dcp.load(wanted, checkpoint_id=str(path))
    return meta


def resume_into(trainer: Any, path: Path) -> dict[str, Any]:
    """Load the sharded checkpoint ``path`` into a Trainer's weights, optimisers and EMA (any world
    size, FSDP or not) and return its ``trainer.pt`` for the Trainer's counters and RNG."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors, _ = live_tensors(trainer)
    meta = load_torch_file(Path(path) / META, map_location="cpu")
    check_format(meta, path)
    if "rl_reference" in meta.get("sharded_keys", ()):  # shaped (and sharded) like the student
        tensors["rl_reference"] = {n: p.detach().clone() for n, p in tensors["student"].items()}
    meta = load_into(path, tensors)
    if "rl_reference" in tensors:
        meta["rl"] = {**meta["rl"], "reference": tensors["rl_reference"]}
    owner = trainer.critic if trainer.critic is not None else trainer.guidance
    for key, network, opt in (
        ("student", trainer.student.network, trainer.opt_g),
        ("critic", owner.network, trainer.opt_c),
    ):
        osd = {"state": tensors[f"opt_{key}"], "param_groups": meta["param_groups"][f"opt_{key}"]}
        set_optimizer_state_dict(network, opt, osd)
    return meta
