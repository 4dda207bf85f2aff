"""Prompt datasets for text-to-image DMDR: reading prompt files and sampling prompt batches.

DMDR trains on conditions only (no images), so a text-to-image data set is a list of prompts.
:func:`load_prompts` reads them from ``.txt``, ``.jsonl``, ``.csv`` or ``.tsv`` files;
:class:`PromptSampler` is the Trainer's ``ConditionSampler`` over raw prompts (the student encodes
them with its text encoders every step). With a prompt cache
(:mod:`dmdr_fast.data.prompt_cache`) the sampler returns :class:`PromptBatch` instead: the
prompts together with their pre-encoded condition, so the text encoders can be dropped.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_PROMPT_COLUMNS", "PromptBatch", "PromptSampler", "load_prompts"]

#: Columns / keys tried in order when ``column`` is not given.
DEFAULT_PROMPT_COLUMNS = ("prompt", "caption", "text")

_FORMATS = (".txt", ".jsonl", ".csv", ".tsv")


def load_prompts(
    path: str | os.PathLike[str],
    *,
    column: str | None = None,
    limit: int | None = None,
    dedupe: bool = False,
) -> list[str]:
    """Read prompts from a file, in file order.

    Formats (by extension):

    - ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    - ``.jsonl``: one JSON value per line, either an object (the prompt is its ``column`` key) or a
      bare string; blank lines are skipped.
    - ``.csv`` / ``.tsv``: a header row, then one row per prompt (the ``column`` column).

    Prompts are stripped of surrounding whitespace, and empty ones are skipped (the empty prompt is
    the null condition, which the adapters provide themselves).

    Args:
        path: The prompt file.
        column: JSONL key / CSV column holding the prompt. Default: the first of
            :data:`DEFAULT_PROMPT_COLUMNS` present (in the first object / the header).
        limit: Keep only the first ``limit`` prompts (after de-duplication).
        dedupe: Drop repeated prompts, keeping the first occurrence.

    Returns:
        The prompts.

    Raises:
        ValueError: If the file is missing, its extension unknown, a JSON line malformed (the
            message gives the line number), the column missing (the message lists the available
            ones), ``limit`` not positive, or no prompt is left.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"unknown prompt file extension {suffix!r} of {str(path)!r}; use one of {_FORMATS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts, got {limit}")
    if suffix == ".txt":
        raw = _read_txt(path)
    elif suffix == ".jsonl":
        raw = _read_jsonl(path, column)
    else:
        raw = _read_table(path, column, "\t" if suffix == ".tsv" else ",")
    prompts = [p.strip() for p in raw]
    prompts = [p for p in prompts if p]
    if dedupe:
        prompts = list(dict.fromkeys(prompts))  # dicts keep insertion order: first occurrence wins
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts found in {str(path)!r}")
    return prompts


def _read_txt(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _pick_column(available: list[str], column: str | None, where: str) -> str:
    """The requested column, or the first default one present; a clear error otherwise."""
    if column is not None:
        if column not in available:
            raise ValueError(f"column {column!r} not found in {where}; available: {available}")
        return column
    for name in DEFAULT_PROMPT_COLUMNS:
        if name in available:
            return name
    raise ValueError(
        f"none of the default prompt columns {list(DEFAULT_PROMPT_COLUMNS)} found in {where}; "
        f"available: {available} (pass column=...)"
    )


def _read_jsonl(path: Path, column: str | None) -> list[str]:
    prompts: list[str] = []
    key: str | None = None  # resolved on the first object, then required on every object
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"malformed JSON on line {lineno} of {str(path)!r}: {e.msg}") from e
            if isinstance(value, dict):
                if key is None:
                    key = _pick_column(list(value), column, where)
                elif key not in value:
                    raise ValueError(f"column {key!r} not found in {where}; available: {list(value)}")
                value = value[key]
            if not isinstance(value, str):
                raise ValueError(f"the prompt on line {lineno} of {str(path)!r} is not a string: {value!r}")
            prompts.append(value)
    return prompts


def _read_table(path: Path, column: str | None, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise ValueError(f"no prompts found in {str(path)!r} (no header row)")
        key = _pick_column(list(reader.fieldnames), column, f"the header of {str(path)!r}")
        # A short row gives None for the missing cells: treat it as an empty prompt (skipped).
        return [row[key] or "" for row in reader]


@dataclass(frozen=True)
class PromptSampler:
    """Uniform sampling of prompts with replacement: the Trainer's ``ConditionSampler`` for prompts.

    Attributes:
        prompts: The prompts to draw from (any sequence is stored as a tuple).
    """

    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        prompts = tuple(self.prompts)
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("PromptSampler prompts must all be strings")
        object.__setattr__(self, "prompts", prompts)  # frozen: bypass to normalise to a tuple

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> PromptSampler:
        """A sampler over :func:`load_prompts` ``(path, **kwargs)``."""
        return cls(tuple(load_prompts(path, **kwargs)))

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator) -> list[str]:
        """``batch_size`` prompts drawn uniformly with replacement.

        The indices come from ``torch.randint(len(self), (batch_size,), generator=generator)``, so
        the draw is a function of the generator's state (a resumed run draws the same prompts) and
        matches :class:`~dmdr_fast.data.prompt_cache.CachedPromptSampler` over the same prompts.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        indices = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        return [self.prompts[i] for i in indices.tolist()]


@dataclass(frozen=True)
class PromptBatch:
    """A prompt batch with its condition already encoded (what a cached sampler returns).

    The Trainer uses ``condition`` as the batch's condition instead of calling
    ``student.encode_condition`` (so no text encoder runs, and they can be dropped), and passes
    ``prompts`` to the rewards, which score images against the prompt text.

    Attributes:
        prompts: The ``B`` prompts.
        condition: Their condition batch: the adapter's condition dataclass with tensors
            ``(B, ...)`` (e.g. an ``SD3Condition``), on the sampler's device.
    """

    prompts: list[str]
    condition: Any

    def __len__(self) -> int:
        return len(self.prompts)
