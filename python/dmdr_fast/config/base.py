"""``ConfigBase``: the mixin that gives every config dataclass its checks and its file methods."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dmdr_fast.config.engine import ConfigError, _coerce, _hints, _init_fields, from_dict, to_dict
from dmdr_fast.config.files import apply_overrides, describe, load_yaml, replace_path, save_yaml

__all__ = ["ConfigBase"]

T = TypeVar("T")


class ConfigBase:
    """Mixin for frozen config dataclasses: type checks and normalisation at construction.

    ``__post_init__`` checks every field against its annotation exactly as :func:`from_dict`
    does (lists become tuples, ints become floats for float fields, mappings become nested
    configs) and raises :class:`ConfigError` naming ``<Class>.<field>``. Subclasses add their
    range and cross-field checks in their own ``__post_init__`` after calling
    ``super().__post_init__()``.
    """

    def __post_init__(self) -> None:
        cls = type(self)
        hints = _hints(cls)
        for f in _init_fields(cls):
            value = getattr(self, f.name)
            try:
                coerced = _coerce(value, hints[f.name], f.name)
            except ConfigError as err:
                raise err.with_owner(cls.__name__) from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)  # frozen: set once, during construction

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from plain data (:func:`from_dict`)."""
        return from_dict(cls, data)

    @classmethod
    def load_yaml(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
        """Load from a YAML file with optional overrides (:func:`load_yaml`)."""
        return load_yaml(cls, path, overrides)

    @classmethod
    def describe(cls) -> str:
        """Every field with type, default and help (:func:`describe`)."""
        return describe(cls)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (:func:`to_dict`)."""
        return to_dict(self)

    def save_yaml(self, path: str | os.PathLike[str], *, header: str | None = None) -> Path:
        """Write as YAML, atomically (:func:`save_yaml`)."""
        return save_yaml(self, path, header=header)

    def with_overrides(self: T, overrides: Sequence[str]) -> T:
        """A copy with ``"a.b=value"`` overrides applied (:func:`apply_overrides`)."""
        return apply_overrides(self, overrides)

    def replace_path(self: T, path: str, value: Any) -> T:
        """A copy with the field at dotted ``path`` set to ``value`` (:func:`replace_path`)."""
        return replace_path(self, path, value)
