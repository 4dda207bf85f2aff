"""The named presets (``<name>.yaml`` in this folder) and :func:`load_preset`.

``dmdr-fast train --preset digits`` and ``load_preset("digits", ["student.num_steps=4"])`` read
``digits.yaml`` here and apply ``--set``-style overrides. Every text-to-image preset lists every
config option with a comment (tested), so a preset file is also the documentation of a recipe.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from dmdr_fast.config import ConfigError, DMDRTrainerConfig

__all__ = ["CONFIG_DIR", "load_preset", "preset_names"]

#: The folder that holds the preset YAML files (shipped inside the package).
CONFIG_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """The names ``--preset`` accepts, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: Sequence[str] = ()) -> DMDRTrainerConfig:
    """A named preset from ``dmdr_fast/configs/<name>.yaml`` with ``--set``-style overrides.

    Raises:
        ConfigError: Unknown name (the message suggests the closest preset), or a bad override.
    """
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(preset_names())}")
    return DMDRTrainerConfig.load_yaml(path, overrides=list(overrides))
