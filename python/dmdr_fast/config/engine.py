"""The config engine: typed construction of nested frozen dataclasses from plain data, and back.

A generic engine, independent of the DMDR schema (:mod:`dmdr_fast.config.schema`); why we keep
our own rather than a library is written down in docs/architecture.md ("The config engine").

- :func:`from_dict` builds a (nested) dataclass from plain data, type-checking every value against
  the field's annotation; :func:`to_dict` goes back to plain data (tuples become lists).
- :func:`require` and :func:`check_range` raise errors that name the field from ``__post_init__``.

Supported annotations: ``int`` (an integral float such as ``1e4`` is accepted), ``float`` (ints
accepted; must be finite), ``bool``, ``str``, ``Literal[...]``, ``tuple[X, ...]`` and fixed
``tuple[X, Y]``, ``X | None``, unions, nested dataclasses (from a mapping), ``dict[str, X]`` and
``Any`` (plain YAML data only: null, bool, number, string, list, mapping with string keys).

Every error is a :class:`ConfigError` whose message starts with the dotted field name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = [
    "NAME_PATTERN",
    "ConfigError",
    "check_range",
    "from_dict",
    "require",
    "to_dict",
]

T = TypeVar("T")
_NONE_TYPE = type(None)
#: What a name field (model family, backend, run name parts) must look like.
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_FLOAT_TEXT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type, out-of-range value or inconsistent fields.

    Attributes:
        reason: What is wrong and what is expected.
        field: Dotted path of the offending field (``"student.num_steps"``), or None.
        owner: Class name of the config that raised, when the error did not come through
            :func:`from_dict` (which replaces it by the dotted path from the root).
    """

    def __init__(self, reason: str, *, field: str | None = None, owner: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.owner = owner
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = ".".join(part for part in (self.owner, self.field) if part)
        return f"{where}: {self.reason}" if where else self.reason

    def __str__(self) -> str:
        return self._compose()

    def within(self, path: str) -> ConfigError:
        """The same error seen from the parent at dotted ``path`` (the owner is dropped)."""
        field = ".".join(part for part in (path, self.field) if part) or None
        return ConfigError(self.reason, field=field)

    def with_owner(self, owner: str) -> ConfigError:
        """The same error attributed to the config class ``owner``."""
        return ConfigError(self.reason, field=self.field, owner=owner)


# --------------------------------------------------------------------------------------------------
# Schema helpers.
# --------------------------------------------------------------------------------------------------


def require(obj: object, name: str, ok: bool, expectation: str) -> None:
    """Raise a :class:`ConfigError` naming ``type(obj).<name>`` unless ``ok``.

    Args:
        obj: The config instance being validated.
        name: Field name.
        ok: The condition that must hold.
        expectation: What the value must be, e.g. ``"in 1..8"``; the message reads
            ``"must be <expectation>, got <value>"``.
    """
    if not ok:
        raise ConfigError(
            f"must be {expectation}, got {getattr(obj, name)!r}", field=name, owner=type(obj).__name__
        )


def check_range(
    obj: object,
    name: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """Raise a :class:`ConfigError` naming the field unless ``ge <= value``, ``gt < value``,
    ``value <= le`` and ``value < lt`` (for the bounds given)."""
    value = getattr(obj, name)
    tests = [(ge, ">=", lambda b: value >= b), (gt, ">", lambda b: value > b)]
    tests += [(le, "<=", lambda b: value <= b), (lt, "<", lambda b: value < b)]
    parts = [f"{op} {bound}" for bound, op, _ in tests if bound is not None]
    ok = all(test(bound) for bound, _, test in tests if bound is not None)
    require(obj, name, ok, " and ".join(parts))


def _is_dataclass_type(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_dataclass_instance(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _hints(cls: type) -> dict[str, Any]:
    # A plain wrapper: mypy rejects a class object ``type[C]`` as the Hashable argument of a
    # functools.cache function (it checks C's instance __hash__), but accepts a ``type``.
    return _cached_hints(cls)


@functools.cache
def _cached_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_union(tp: object) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> Any:
    """``X`` for ``X | None``; the annotation itself otherwise."""
    if _is_union(tp):
        members = [a for a in get_args(tp) if a is not _NONE_TYPE]
        if len(members) == 1:
            return members[0]
    return tp


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or get_origin(tp) in (dict, Mapping)


def _type_name(tp: Any) -> str:
    """Readable annotation: ``int``, ``'fp32' | 'bf16'``, ``tuple[str, ...]``, ``float | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "Any"
    if tp is _NONE_TYPE:
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"tuple[{', '.join(_type_name(a) for a in args)}]"
    if _is_mapping_type(tp):
        return f"dict[{', '.join(_type_name(a) for a in args)}]" if args else "dict"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------------------------------
# Coercion: one value against one annotation.
# --------------------------------------------------------------------------------------------------


def _did_you_mean(candidates: Sequence[str]) -> str:
    return f" (did you mean {' or '.join(repr(c) for c in candidates)}?)" if candidates else ""


def _fail(path: str, tp: Any, value: object, hint: str = "") -> ConfigError:
    return ConfigError(f"expected {_type_name(tp)}, got {_show(value)}{hint}", field=path or None)


def _plain(value: Any, path: str) -> Any:
    """Check that ``value`` is plain YAML data; tuples become lists so that a round trip is exact."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, _join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"mapping keys must be strings, got {_show(key)}", field=path or None)
            out[key] = _plain(v, _join(path, key))
        return out
    raise ConfigError(
        f"must be plain data (null, bool, number, string, list or mapping) to survive a YAML round "
        f"trip, got {_show(value)}",
        field=path or None,
    )


def _coerce_scalar(value: Any, tp: type, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, tp, value, " (write true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _fail(path, tp, value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value.strip().replace("_", ""))  # "2e-5": a float PyYAML read as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"expected a finite float, got {value!r}", field=path or None)
            return float(value)
        raise _fail(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, tp, value, " (quote the value to make it a string)")
    if isinstance(value, tp):
        return value
    raise _fail(path, tp, value)


def _coerce_union(value: Any, tp: Any, path: str) -> Any:
    members = get_args(tp)
    if value is None:
        if _NONE_TYPE in members:
            return None
        raise _fail(path, tp, value)
    candidates = [m for m in members if m is not _NONE_TYPE]
    if len(candidates) == 1:
        return _coerce(value, candidates[0], path)
    for member in candidates:
        with contextlib.suppress(ConfigError):
            return _coerce(value, member, path)
    raise _fail(path, tp, value)


def _coerce_tuple(value: Any, tp: Any, path: str) -> tuple:
    args = get_args(tp)
    if not isinstance(value, (list, tuple)):
        hint = " (write a list, e.g. [a, b])" if isinstance(value, str) else ""
        raise _fail(path, tp, value, hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], _join(path, i)) for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(
            f"expected {_type_name(tp)} ({len(args)} items), got {len(value)} items: {list(value)!r}",
            field=path or None,
        )
    if not args:
        return tuple(_plain(v, _join(path, i)) for i, v in enumerate(value))
    return tuple(_coerce(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))


def _coerce_mapping(value: Any, tp: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise _fail(path, tp, value)
    args = get_args(tp)
    value_type = args[1] if len(args) == 2 else Any
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"mapping keys must be strings, got {_show(key)}", field=path or None)
        out[key] = _coerce(item, value_type, _join(path, key))
    return out


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it normalised (lists → tuples etc.)."""
    origin = get_origin(tp)
    if tp is Any:
        return _plain(value, path)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path)
        raise _fail(path, tp, value, f" (write a mapping of {tp.__name__} fields)")
    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}{hint}",
            field=path or None,
        )
    if _is_union(tp):
        return _coerce_union(value, tp, path)
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, tp, path)
    if _is_mapping_type(tp):
        return _coerce_mapping(value, tp, path)
    if isinstance(tp, type):
        return _coerce_scalar(value, tp, path)
    raise TypeError(f"config_io does not support the annotation {tp!r} (field {path!r})")


# --------------------------------------------------------------------------------------------------
# Dataclass <-> plain data.
# --------------------------------------------------------------------------------------------------


def _unknown_key_error(cls: type, path: str, bad: list[object], names: list[str]) -> ConfigError:
    key = bad[0]
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    others = f"; also unknown: {', '.join(repr(b) for b in bad[1:])}" if len(bad) > 1 else ""
    return ConfigError(
        f"unknown key {key!r}{_did_you_mean(close)}{others}; valid keys of {path or cls.__name__}: "
        f"{', '.join(names)}",
        field=_join(path, key),
    )


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` from plain data, recursively, with type checks.

    Missing keys take their defaults; nested dataclasses are built from nested mappings; lists
    become tuples. The class's own ``__post_init__`` validation runs as usual.

    Args:
        cls: A dataclass type.
        data: A mapping of field names to values (an instance of ``cls`` is returned as is).
        path: Dotted location of ``data`` in the root config, used in error messages.

    Returns:
        The instance.

    Raises:
        ConfigError: On an unknown key (listing the valid ones and close matches), a missing
            required key, a value of the wrong type, or a failed validation — always naming the
            dotted field.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping of {cls.__name__} fields, got {_show(data)}", field=path or None
        )
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    bad = [key for key in data if key not in names]
    if bad:
        raise _unknown_key_error(cls, path, bad, names)
    hints = _hints(cls)
    kwargs = {key: _coerce(value, hints[key], _join(path, key)) for key, value in data.items()}
    missing = [
        f.name
        for f in fields
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"required key missing (required: {', '.join(missing)})", field=_join(path, missing[0])
        )
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.within(path) from None
    except (TypeError, ValueError) as err:  # validation of a dataclass that is not a ConfigBase
        raise ConfigError(str(err), field=path or None) from err


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a config: the inverse of :func:`from_dict`.

    Args:
        obj: A dataclass instance (or any nesting of dataclasses, mappings, lists and tuples).

    Returns:
        A new ``dict`` for a dataclass, with fields in declaration order and tuples as lists.
    """
    if _is_dataclass_instance(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(type(obj))}
    if isinstance(obj, Mapping):
        return {key: to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(value) for value in obj]
    return obj
