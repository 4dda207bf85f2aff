"""Deprecated alias of :mod:`dmdr_fast.config` (the config engine moved out of ``train/``).

``from dmdr_fast.train.config_io import describe`` keeps working with a ``DeprecationWarning``;
import from :mod:`dmdr_fast.config` instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import dmdr_fast.config as _config


def __getattr__(name: str) -> Any:
    value = getattr(_config, name)
    warnings.warn(
        f"dmdr_fast.train.config_io.{name} moved to dmdr_fast.config.{name}", DeprecationWarning, stacklevel=2
    )
    return value
