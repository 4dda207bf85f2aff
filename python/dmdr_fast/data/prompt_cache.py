"""A cache of text embeddings, so text-to-image training runs without its text encoders.

Text encoders (CLIP, T5...) can be larger than the LoRA-trained denoiser and give the same output
for a prompt every step: :func:`build_prompt_cache` encodes a prompt list once with
``adapter.encode_condition`` and writes it to a folder::

    cache.json              format version, text fingerprint, condition class, fields, shards
    prompts.jsonl           the prompts in order, one JSON string per line
    null.safetensors        the adapter's null (empty-prompt) condition, batch 1
    shard_00000.safetensors one tensor per condition field, (n_in_shard, *per_sample_shape)
    ...

:class:`PromptCache` reads it back lazily (memory-mapped rows via ``safe_open``),
:class:`CachedPromptSampler` draws :class:`~dmdr_fast.data.prompts.PromptBatch` es for the Trainer,
and :func:`install_null_condition` gives the adapter its null condition, after which
``adapter.drop_text_encoders()`` frees the encoders.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import importlib
import itertools
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dmdr_fast._errors import UserError
from dmdr_fast._io import (
    PROGRESS_NAME,
    atomic_write_text,
    load_safetensors,
    open_safetensors,
    read_progress,
    write_progress,
)
from dmdr_fast.conditions import map_tensors
from dmdr_fast.data.prompts import PromptBatch

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CachedPromptSampler",
    "PromptCache",
    "PromptCacheMismatchError",
    "build_prompt_cache",
    "install_null_condition",
]

CACHE_FORMAT_VERSION = 1
_META, _PROMPTS, _NULL = "cache.json", "prompts.jsonl", "null.safetensors"
_REBUILD = "Rebuild it with `dmdr-fast cache-prompts`."
log = logging.getLogger(__name__)


class PromptCacheMismatchError(ValueError, UserError):
    """The cache was built by another text encoder / settings / prompt list than the one at hand."""


def model_identity(path: str | os.PathLike[str] | None) -> str | None:
    """How caches (prompt encodings, ODE pairs) name their model: the absolute path of a local
    folder, else the hub id as given."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    out = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (e.g. 'bfloat16'), got {dtype!r}")
    return out


def _jsonable(obj: Any) -> Any:
    """What ``obj`` reads back as from JSON (tuples → lists...), for comparing with stored values."""
    return json.loads(json.dumps(obj, default=str))


def _class_ref(cls: type) -> dict[str, str]:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


def _condition_class(path: Path, ref: dict[str, str]) -> type:
    """The condition dataclass ``cache.json`` names, imported only from dmdr_fast itself.

    The name comes from a file that may have been shared: importing any module it named would run
    that module's code, and calling any callable it named with the stored tensors could do
    anything. The adapters' condition classes all live in ``dmdr_fast.models``.
    """
    module, qualname = str(ref.get("module", "")), str(ref.get("qualname", ""))
    if module.split(".")[0] != "dmdr_fast":
        raise ValueError(
            f"refused to open prompt cache {path}: its {_META} names the condition class "
            f"{module}.{qualname}, outside dmdr_fast; importing it would run that module's code. "
            f"Open it with the adapter it was built for (PromptCache.open(path, adapter)). {_REBUILD}"
        )
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"prompt cache {path}: {module}.{qualname} is not a condition dataclass. {_REBUILD}")
    return obj


def _mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored X vs model Y`` for every key whose value differs (or is missing on one side)."""
    pairs = {k: (stored.get(k, "<absent>"), current.get(k, "<absent>")) for k in set(stored) | set(current)}
    return [f"{k!r}: stored {a!r} vs model {b!r}" for k, (a, b) in sorted(pairs.items()) if a != b]


def _identity(adapter: Any, prompts: Sequence[str], model_id: Any, dtype: torch.dtype | None) -> dict:
    """What makes a cache equal to the one a build would write (compared for the no-op rerun)."""
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return _jsonable(
        {
            "fingerprint": adapter.text_fingerprint(),
            "condition_class": _class_ref(adapter.condition_class),
            "model_id": None if model_id is None else str(model_id),
            "storage_dtype": None if dtype is None else _dtype_name(dtype),
            "prompts_sha256": digest,
        }
    )


def _flatten(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity with the fingerprint's keys inlined, so that a mismatch names the key that differs."""
    return {**{k: v for k, v in identity.items() if k != "fingerprint"}, **(identity["fingerprint"] or {})}


def _to_storage(cond: Any, dtype: torch.dtype | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Condition fields as contiguous CPU tensors (floating ones cast to ``dtype`` if given), and
    their spec ``name → {"shape": per-sample shape, "dtype"}`` (``None`` for an absent field)."""
    tensors: dict[str, Any] = {}
    for f in dataclasses.fields(cond):
        v = getattr(cond, f.name)
        if isinstance(v, torch.Tensor):  # contiguous: null_condition gives expanded views
            v = v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
        tensors[f.name] = v
    spec = {
        k: None if v is None else {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)}
        for k, v in tensors.items()
    }
    return tensors, spec


def build_prompt_cache(
    adapter: Any,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    shard_size: int = 4096,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    model_id: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Encode ``prompts`` with ``adapter.encode_condition`` and write a prompt cache to ``out_dir``.

    The cache is built in ``<out_dir>.tmp`` and renamed into place when complete (``cache.json``
    written last), so an interrupted build never leaves a folder that :meth:`PromptCache.open`
    accepts; rerun with the same arguments, it continues after the last complete shard (a
    ``progress.json`` in the temporary folder records them). If ``out_dir`` already holds a
    complete cache of the same fingerprint, condition class, ``model_id``, storage dtype and
    prompts, nothing is done.

    Args:
        adapter: A ``TextToImageAdapter`` with its text encoders; ``prompts`` are stored in order.
        batch_size: Prompts per ``encode_condition`` call; ``shard_size``: prompts per shard.
        dtype: Storage dtype of the floating fields (e.g. ``torch.bfloat16``); default: as encoded.
        progress: Show a tqdm bar (and report a skipped build on stderr).
        model_id: What identifies the weights (e.g. the pipeline folder): the fingerprint covers
            only architectures and settings.
        overwrite: Replace an existing cache that differs (otherwise that is an error).
        settings: The config fields the adapter was built with (dotted ``model.*`` names →
            values), stored so that a mismatch found later names the fields, not encoder hashes.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        PromptCacheMismatchError: If ``out_dir`` holds a different cache and ``overwrite`` is false.
        ValueError: On bad prompts or sizes, or conditions whose per-sample shape or dtype changes
            between batches (cached conditions need fixed per-sample shapes).
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("build_prompt_cache needs a non-empty list of string prompts")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}")
    dtype = None if dtype is None else _as_dtype(dtype)
    out_dir = Path(out_dir)
    identity = _identity(adapter, prompts, model_id, dtype)
    if (out_dir / _META).is_file():
        stored = json.loads((out_dir / _META).read_text())
        diff = _mismatch(_flatten({k: stored.get(k) for k in identity}), _flatten(identity))
        if not diff:
            msg = f"prompt cache {out_dir} is up to date ({len(prompts)} prompts); nothing to do"
            log.info(msg)
            if progress:
                print(msg, file=sys.stderr)
            return out_dir
        if not overwrite:
            raise PromptCacheMismatchError(
                f"{out_dir} holds a different prompt cache ({'; '.join(diff)}); pass overwrite=True to replace it"
            )
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{out_dir} exists and is not a complete prompt cache; pass overwrite=True to replace it"
        )

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    build = {
        **identity,
        "format_version": CACHE_FORMAT_VERSION,
        "batch_size": batch_size,
        "shard_size": shard_size,
    }
    resumed = read_progress(tmp, build)
    if resumed is None:  # nothing to continue (or another build's leftovers): start afresh
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    elif progress:
        done = sum(sh["count"] for sh in resumed["shards"])
        print(f"prompt cache: continuing {tmp} after {done} of {len(prompts)} prompts", file=sys.stderr)
    # An interruption keeps tmp (and its progress) for the next run to continue.
    meta = _encode_into(adapter, prompts, tmp, batch_size, shard_size, dtype, progress, build, resumed)
    meta.update(identity, format="dmdr_fast.prompt_cache", version=CACHE_FORMAT_VERSION)
    if settings is not None:
        meta["settings"] = _jsonable(settings)
    atomic_write_text(tmp / _META, json.dumps(meta, indent=2, sort_keys=True))
    (tmp / PROGRESS_NAME).unlink(missing_ok=True)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():  # overwrite, or an empty folder: move aside first, then swap in
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


@torch.no_grad()
def _encode_into(
    adapter, prompts, folder, batch_size, shard_size, dtype, progress, build, resumed
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    # The first batch's spec; every batch must match it (a resumed build keeps the stored one).
    fields: dict[str, Any] | None = resumed["fields"] if resumed else None
    shards = list(resumed["shards"]) if resumed else []
    done = sum(sh["count"] for sh in shards)  # shards hold whole shard_size chunks but the last
    bar = tqdm(total=len(prompts), initial=done, desc="encoding prompts", unit="prompt", disable=not progress)
    with bar, (folder / _PROMPTS).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts[:done])  # rewritten: no half-written line
        for start in range(done, len(prompts), shard_size):
            chunk, parts = prompts[start : start + shard_size], []
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b : b + batch_size]
                part, spec = _to_storage(adapter.encode_condition(batch), dtype)
                fields = spec if fields is None else fields
                if spec != fields or any(v is not None and len(v) != len(batch) for v in part.values()):
                    raise ValueError(
                        f"condition fields changed between batches ({spec} vs {fields}) or do not have "
                        f"batch size {len(batch)}; cached conditions need fixed per-sample shapes"
                    )
                parts.append(part)
                bar.update(len(batch))
            name = f"shard_{len(shards):05d}.safetensors"
            assert fields is not None  # set by the chunk's first batch
            tensors = {k: torch.cat([p[k] for p in parts]) for k, s in fields.items() if s is not None}
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            shards.append({"file": name, "count": len(chunk)})
            f.writelines(json.dumps(p) + "\n" for p in chunk)
            write_progress(folder, build, shards, fields=fields)
    null, spec = _to_storage(adapter.null_condition(1), dtype)
    if spec != fields:
        raise ValueError(f"the null condition's fields {spec} differ from the prompts' {fields}")
    null = {k: v for k, v in null.items() if v is not None}
    save_file(null, str(folder / _NULL), metadata={"format": "pt"})
    return {"fields": fields, "shards": shards, "count": len(prompts)}


class PromptCache:
    """A prompt cache on disk (see the module docstring); open it with :meth:`open`.

    Shards are opened on first use and rows are read through ``safe_open`` slices (memory-mapped),
    so a cache larger than RAM costs only the rows a batch gathers.
    """

    def __init__(self, path: Path, meta: dict[str, Any], condition_class: type) -> None:
        self.path, self.meta, self.condition_class = path, meta, condition_class
        self.fields: dict[str, Any] = meta["fields"]  # name → {"shape", "dtype"}; None: absent field
        self._offsets = [0, *itertools.accumulate(int(s["count"]) for s in meta["shards"])]
        lines = (path / _PROMPTS).read_text(encoding="utf-8").splitlines()
        self.prompts: list[str] = [json.loads(line) for line in lines]
        if len(self.prompts) != meta["count"] or self._offsets[-1] != meta["count"]:
            raise ValueError(f"prompt cache {path} is inconsistent (prompt/shard counts). {_REBUILD}")
        self._slices: dict[int, dict[str, Any]] = {}  # shard → field → safetensors slice

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        adapter: Any = None,
        *,
        model_id: Any = None,
        settings: dict[str, Any] | None = None,
    ) -> PromptCache:
        """Open a complete cache; with ``adapter`` (and ``model_id``), check it was built for it.

        ``settings`` (as given to :func:`build_prompt_cache`) only words a mismatch: the fields
        that differ from the cache's build are named first.

        Raises:
            ValueError: If ``path`` is not a complete cache of a supported format version.
            PromptCacheMismatchError: If ``adapter``'s text fingerprint or condition class (or
                ``model_id``, when both it and the stored one are set) differ from the stored ones.
        """
        path = Path(path)
        if not (path / _META).is_file():
            raise ValueError(
                f"{path} is not a complete prompt cache (no {_META}: missing or interrupted). {_REBUILD}"
            )
        meta = json.loads((path / _META).read_text())
        if meta.get("format") != "dmdr_fast.prompt_cache" or meta.get("version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"{path} has an unsupported prompt cache format/version. {_REBUILD}")
        if adapter is None:
            return cls(path, meta, _condition_class(path, meta["condition_class"]))
        cache = cls(path, meta, adapter.condition_class)
        cache.check(adapter, model_id=model_id, settings=settings)
        return cache

    def check(self, adapter: Any, *, model_id: Any = None, settings: dict[str, Any] | None = None) -> None:
        """Raise :class:`PromptCacheMismatchError` unless the cache was built by ``adapter``'s encoders."""
        stored, current = dict(self.meta["fingerprint"]), _jsonable(adapter.text_fingerprint())
        stored["condition_class"] = self.meta["condition_class"]
        current["condition_class"] = _class_ref(adapter.condition_class)
        if model_id is not None and self.meta.get("model_id") is not None:
            stored["model_id"], current["model_id"] = self.meta["model_id"], str(model_id)
        diff = _mismatch(stored, current)
        if not diff:
            return
        built = self.meta.get("settings")
        fields = [] if built is None or settings is None else _mismatch(built, _jsonable(settings))
        if fields:  # what the user set differently, before the encoders' hashes
            named = "; ".join(
                d.replace(": stored", ": cache").replace(" vs model ", " vs this run ") for d in fields
            )
            raise PromptCacheMismatchError(
                f"prompt cache {self.path} was built with other model settings: {named} (cache-prompts "
                f"needs the same model.* overrides as train). Encoders: {'; '.join(diff)}. {_REBUILD}"
            )
        raise PromptCacheMismatchError(
            f"prompt cache {self.path} was built for another text encoder or settings: "
            f"{'; '.join(diff)}. {_REBUILD}"
        )

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _slice(self, shard: int, field: str) -> Any:
        if shard not in self._slices:
            handle = open_safetensors(self.path / self.meta["shards"][shard]["file"])
            self._slices[shard] = {k: handle.get_slice(k) for k, s in self.fields.items() if s is not None}
        return self._slices[shard][field]

    def condition(self, indices: Sequence[int] | torch.Tensor) -> Any:
        """The condition batch of the prompts at ``indices`` (any order, repeats allowed).

        Args:
            indices: ``B`` integer indices into :attr:`prompts` (a list or a 1-D tensor).

        Returns:
            A :attr:`condition_class` batch whose tensors are ``(B, *per_sample_shape)`` on the
            CPU, in the stored dtype.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"prompt cache indices must be in [0, {len(self)}), got {idx.tolist()}")
        unique, inverse = torch.unique(idx, return_inverse=True)  # read each row once
        shards = [bisect.bisect_right(self._offsets, i) - 1 for i in unique.tolist()]
        locals_ = [i - self._offsets[s] for i, s in zip(unique.tolist(), shards)]
        values: dict[str, torch.Tensor | None] = dict.fromkeys(self.fields)
        for name, spec in self.fields.items():
            if spec is not None:
                rows = [self._slice(s, name)[j : j + 1] for s, j in zip(shards, locals_)]
                empty = torch.empty((0, *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
                values[name] = torch.cat(rows)[inverse] if rows else empty
        return self.condition_class(**values)

    def null_condition(self) -> Any:
        """The stored batch-1 null (empty-prompt) condition, on the CPU in the stored dtype."""
        tensors = load_safetensors(self.path / _NULL)
        return self.condition_class(**{name: tensors.get(name) for name in self.fields})


@dataclasses.dataclass(frozen=True, eq=False)
class CachedPromptSampler:
    """The Trainer's ``ConditionSampler`` over a :class:`PromptCache`: batches with their conditions.

    Draws the same indices as :class:`~dmdr_fast.data.prompts.PromptSampler` over ``cache.prompts``
    for the same generator state.

    Attributes:
        cache: The opened cache.
        device: Where the condition tensors go (``None``: stay on the CPU).
    """

    cache: PromptCache
    device: torch.device | str | None = None

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, batch_size: int, generator: torch.Generator) -> PromptBatch:
        """``batch_size`` prompts uniformly with replacement, and their condition ``(B, ...)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        indices = torch.randint(len(self.cache), (batch_size,), generator=generator)
        cond = self.cache.condition(indices)
        if self.device is not None:
            cond = map_tensors(lambda v: v.to(self.device), cond)
        return PromptBatch(prompts=[self.cache.prompts[i] for i in indices.tolist()], condition=cond)


def install_null_condition(adapter: Any, cache: PromptCache, *, check: bool = True) -> None:
    """``adapter.set_null_condition(cache.null_condition())``, after checking the cache fits ``adapter``.

    Afterwards ``adapter.null_condition(B)`` needs no text encoder (they can be dropped).
    """
    if check:
        cache.check(adapter)
    adapter.set_null_condition(cache.null_condition())
