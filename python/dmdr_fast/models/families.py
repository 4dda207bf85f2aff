"""The model-family registry: what the library knows about each text-to-image family, in one place.

Each family module (``models/sd3.py``, ``flux.py``, ``zimage.py``, ``sdxl.py``) declares its own
:class:`ModelFamily` as ``FAMILY``: the adapter class, the diffusers pipeline class it loads, the
preset a bare ``--pipeline DIR`` command uses, the teacher's usual sampling settings in plain
diffusers, and the builder of random-weight pipelines. This file lists the modules; so a new
family is its module (adapter + ``FAMILY`` + ``random_pipeline``), one line in
:data:`FAMILY_MODULES`, and its preset YAML in ``dmdr_fast/configs/``.

Family modules import diffusers (seconds), so they are imported on first use, not here.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmdr_fast.models.t2i import TextToImageAdapter

__all__ = ["FAMILY_MODULES", "T2I_FAMILIES", "ModelFamily", "families", "family_of_pipeline", "get_family"]

#: ``model.family`` → the module that declares its :class:`ModelFamily` as ``FAMILY``.
FAMILY_MODULES: dict[str, str] = {
    "sd3": "dmdr_fast.models.sd3",
    "flux": "dmdr_fast.models.flux",
    "zimage": "dmdr_fast.models.zimage",
    "sdxl": "dmdr_fast.models.sdxl",
}
#: The ``model.family`` values that name a diffusers text-to-image pipeline.
T2I_FAMILIES: tuple[str, ...] = tuple(FAMILY_MODULES)


@dataclass(frozen=True)
class ModelFamily:
    """One text-to-image family.

    Attributes:
        name: its ``model.family`` value.
        adapter: the :class:`~dmdr_fast.models.t2i.TextToImageAdapter` subclass.
        pipeline_class: the diffusers pipeline class name (``model_index.json``'s ``_class_name``).
        default_preset: the preset a bare ``--pipeline DIR`` command uses.
        sampling_steps: the teacher's usual step count in plain diffusers (evaluation and benchmark
            baselines; the pipeline defaults of diffusers 0.42).
        sampling_guidance: the teacher's usual guidance scale, in the pipeline's own convention
            (Flux: the embedded guidance; Z-Image's ``g`` is standard CFG w = 1 + g).
        random_sizes: the sizes :attr:`random_pipeline` builds (``tiny`` for every family).
        random_pipeline: ``random_pipeline(size, folder, seed, **options)`` → a random-weight
            pipeline (the options are the builder's keyword-only arguments, e.g. SD3's ``t5``).
    """

    name: str
    adapter: type[TextToImageAdapter]
    pipeline_class: str
    default_preset: str
    sampling_steps: int
    sampling_guidance: float
    random_sizes: tuple[str, ...]
    random_pipeline: Callable[..., Any]


def get_family(name: str) -> ModelFamily:
    """The registered family ``name`` (imports its module, and so diffusers).

    Raises:
        ValueError: For a name that is not a text-to-image family (lists the families).
    """
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown text-to-image family {name!r}; known: {list(T2I_FAMILIES)}")
    family = importlib.import_module(FAMILY_MODULES[name]).FAMILY
    assert isinstance(family, ModelFamily) and family.name == name, FAMILY_MODULES[name]
    return family


def families() -> list[ModelFamily]:
    """Every registered family, in :data:`FAMILY_MODULES` order."""
    return [get_family(name) for name in FAMILY_MODULES]


def family_of_pipeline(path: str | os.PathLike[str]) -> str:
    """The family of a local pipeline folder, from ``model_index.json``'s ``_class_name``.

    Raises:
        ValueError: If the folder has no ``model_index.json`` or holds another pipeline class.
    """
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass --family")
    name = json.loads(index.read_text()).get("_class_name")
    by_class = {f.pipeline_class: f.name for f in families()}
    if name not in by_class:
        raise ValueError(f"{path} holds a {name}; supported: {sorted(by_class)} (or pass --family)")
    return by_class[name]
