"""Nested frozen-dataclass configs: build from dicts and YAML, override with ``key.path=value``.

A generic engine, independent of the DMDR schema in :mod:`dmdr_fast.train.config`:

- :func:`from_dict` builds a (nested) dataclass from plain data, type-checking every value against
  the field's annotation; :func:`to_dict` goes back to plain data (tuples become lists).
- :func:`load_yaml` / :func:`save_yaml` read and atomically write YAML files.
- :func:`apply_overrides` applies ``--set``-style strings such as ``"student.num_steps=4"`` or
  ``"student.lora.targets=[to_q, to_v]"``; :func:`replace_path` sets one dotted path from Python.
- :func:`describe` lists every field with its type, default and help text.
- :class:`ConfigBase` is a mixin giving config dataclasses the same type checks at construction;
  :func:`require` and :func:`check_range` raise errors that name the field from ``__post_init__``.

Fields document themselves with ``field(default=..., metadata={"help": "..."})``.

Supported annotations: ``int`` (an integral float such as ``1e4`` is accepted), ``float`` (ints
accepted; must be finite), ``bool``, ``str``, ``Literal[...]``, ``tuple[X, ...]`` and fixed
``tuple[X, Y]``, ``X | None``, unions, nested dataclasses (from a mapping), ``dict[str, X]`` and
``Any`` (plain YAML data only: null, bool, number, string, list, mapping with string keys).

Every error is a :class:`ConfigError` whose message starts with the dotted field name. YAML is read
with a loader that also takes ``1e-8`` and ``2.5e3`` as floats (YAML 1.1, which PyYAML implements,
would read them as strings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import tempfile
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigBase",
    "ConfigError",
    "apply_overrides",
    "check_range",
    "describe",
    "from_dict",
    "load_yaml",
    "parse_override",
    "read_yaml",
    "replace_path",
    "require",
    "save_yaml",
    "to_dict",
]

T = TypeVar("T")
_NONE_TYPE = type(None)
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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------
# YAML.
# --------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-8`` / ``2.5E3`` as floats (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into plain data (an empty file gives ``{}``).

    Raises:
        ConfigError: If the file cannot be read, is not valid YAML, or is not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror or err}") from err
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {_show(data)}")
    return data


def load_yaml(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
    """Load a config of type ``cls`` from a YAML file, then apply ``--set``-style overrides.

    Overrides are applied to the file's data *before* validation, so an override may repair a
    value that the file alone would make invalid.

    Args:
        cls: Root config dataclass.
        path: YAML file; keys it leaves out take their defaults.
        overrides: Strings ``"a.b=value"`` (see :func:`apply_overrides`).

    Returns:
        The validated config.

    Raises:
        ConfigError: Naming the dotted field and the file.
    """
    data = read_yaml(path)
    try:
        data = apply_overrides(data, overrides, cls=cls)
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{err.reason} (config file {path})", field=err.field) from None


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_yaml(obj: Any, path: str | os.PathLike[str], *, header: str | None = None) -> Path:
    """Write a config (dataclass or plain data) as YAML, atomically (temp file + ``os.replace``).

    A reader never sees a half-written file: a kill at any moment leaves either the old file or
    the new one. Parent directories are created.

    Args:
        obj: Config instance or plain data.
        path: Destination.
        header: Optional text written as ``#`` comment lines at the top.

    Returns:
        The path written.
    """
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True, default_flow_style=False)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    p = Path(path)
    _atomic_write_text(p, text)
    return p


# --------------------------------------------------------------------------------------------------
# Dotted paths and overrides.
# --------------------------------------------------------------------------------------------------


def _all_paths(cls: type, prefix: str = "") -> Iterator[str]:
    hints = _hints(cls)
    for f in _init_fields(cls):
        path = _join(prefix, f.name)
        yield path
        tp = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            yield from _all_paths(tp, path)
        elif get_origin(tp) is tuple and _is_dataclass_type(next(iter(get_args(tp)), None)):
            yield from _all_paths(get_args(tp)[0], _join(path, 0))


def _unknown_path_error(cls: type, segments: list[str], depth: int, names: list[str]) -> ConfigError:
    key = ".".join(segments)
    paths = list(_all_paths(cls))
    close = difflib.get_close_matches(key, paths, n=2, cutoff=0.75)
    close += [p for p in paths if p.rsplit(".", 1)[-1] == segments[-1] and p not in close]
    parent = ".".join(segments[:depth]) or "the top level"
    return ConfigError(
        f"unknown config key {key!r}{_did_you_mean(close[:3])}; valid keys at {parent}: {', '.join(names)}",
        field=key,
    )


def _resolve(cls: type, segments: list[str]) -> list[Any]:
    """Annotations along a dotted path (one per segment); raises on a path the schema lacks."""
    key = ".".join(segments)
    tp: Any = cls
    out: list[Any] = []
    for depth, seg in enumerate(segments):
        inner = _strip_optional(tp)
        here = ".".join(segments[:depth])
        if _is_dataclass_type(inner):
            names = [f.name for f in _init_fields(inner)]
            if seg not in names:
                raise _unknown_path_error(cls, segments, depth, names)
            tp = _hints(inner)[seg]
        elif get_origin(inner) is tuple:
            if not seg.isdigit():
                raise ConfigError(f"{here} is a list; address an item by index, e.g. {here}.0", field=key)
            args = get_args(inner)
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            elif int(seg) < len(args):
                tp = args[int(seg)]
            else:
                raise ConfigError(f"index {seg} is out of range for {here} ({_type_name(inner)})", field=key)
        elif _is_mapping_type(inner):
            args = get_args(inner)
            tp = args[1] if len(args) == 2 else Any
        elif inner is Any:
            tp = Any
        else:
            raise ConfigError(f"{here} is a {_type_name(inner)} and has no sub-key {seg!r}", field=key)
        out.append(tp)
    return out


def _empty_container(tp: Any) -> Any:
    inner = _strip_optional(tp)
    return [] if get_origin(inner) is tuple else {}


def _set_in(data: Any, segments: list[str], value: Any, key: str, types_: list[Any] | None) -> None:
    """Set ``data[seg0][seg1]... = value``; missing containers are made per the schema ``types_``."""
    node = data
    for depth, seg in enumerate(segments):
        where = ".".join(segments[:depth]) or "the top level"
        if isinstance(node, list):
            if not seg.isdigit() or int(seg) > len(node):
                raise ConfigError(
                    f"index {seg!r} is out of range: {where} has {len(node)} item(s); use "
                    f"0..{len(node)} ({len(node)} appends a new item)",
                    field=key,
                )
            slot: int | str = int(seg)
            if slot == len(node):
                node.append(None)
        elif isinstance(node, dict):
            slot = seg
        else:
            raise ConfigError(f"{where} is {_show(node)}, not a mapping or list", field=key)
        if depth == len(segments) - 1:
            node[slot] = value
            return
        child = node.get(slot) if isinstance(node, dict) else node[slot]
        if child is None:
            if types_ is None:
                raise ConfigError(f"unknown key {key!r}: {where} has no {seg!r}", field=key)
            child = node[slot] = _empty_container(types_[depth])
        node = child


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"a.b=value"`` into ``("a.b", "value")`` (at the first ``=``).

    Raises:
        ConfigError: If the text has no ``=`` or an empty key segment.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.max_steps=100)")
    return key, raw


def _parse_value(raw: str, tp: Any, key: str) -> Any:
    """YAML-parse an override value; if that does not fit a string-typed field, take the raw text."""
    try:
        parsed, first_error = _parse_yaml(raw), None
    except yaml.YAMLError as err:
        parsed = None
        first_error = ConfigError(f"cannot parse {raw!r} as a YAML value: {err}", field=key)
    if first_error is None:
        try:
            _coerce(parsed, tp, key)
            return parsed
        except ConfigError as err:
            first_error = err
    # e.g. name=007 (YAML reads an int) or path=a: b for a str field: keep the text as written.
    with contextlib.suppress(ConfigError):
        _coerce(raw.strip(), tp, key)
        return raw.strip()
    raise first_error


def apply_overrides(base: Any, overrides: Sequence[str], *, cls: type | None = None) -> Any:
    """Apply ``--set``-style overrides ``"a.b=value"`` to a config or to plain config data.

    Values are parsed as YAML (``4``, ``2e-5``, ``true``, ``null``, ``[a, b]``, ``{rank: 8}``)
    and checked against the field's annotation; for string fields the raw text is used when the
    YAML reading does not fit (``name=007`` gives ``"007"``). A list item is addressed by its
    index (``rewards.0.weight=0.1``); the index one past the end appends an item. A mapping given
    for a nested config replaces it (keys it omits take their defaults).

    Args:
        base: A dataclass instance, or plain data (e.g. a YAML file's content).
        overrides: The override strings, applied in order.
        cls: Schema for plain-data ``base`` (taken from ``base`` when it is a dataclass). Without
            one, every key of the path must already exist in ``base``.

    Returns:
        A new validated instance for a dataclass ``base``; new plain data otherwise.

    Raises:
        ConfigError: On malformed overrides, unknown keys (with close matches suggested), or
            values of the wrong type, naming the dotted key.
    """
    if isinstance(overrides, (str, bytes)):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    is_config = _is_dataclass_instance(base)
    if is_config:
        cls = cls or type(base)
    elif not isinstance(base, Mapping):
        raise TypeError(f"apply_overrides needs a dataclass instance or a mapping, got {type(base).__name__}")
    data = to_dict(base)
    for text in overrides:
        key, raw = parse_override(text)
        segments = key.split(".")
        types_ = _resolve(cls, segments) if cls is not None else None
        value = _parse_value(raw, types_[-1] if types_ else Any, key)
        if types_ is None:
            _check_existing(data, segments, key)
        _set_in(data, segments, value, key, types_)
    return from_dict(cls, data) if is_config else data


def _check_existing(data: Any, segments: list[str], key: str) -> None:
    node = data
    for depth, seg in enumerate(segments):
        if isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            where = ".".join(segments[:depth]) or "the top level"
            if not isinstance(node, dict):
                raise ConfigError(f"unknown key {key!r}: {where} is {_show(node)}", field=key)
            keys = [str(k) for k in node]
            close = difflib.get_close_matches(seg, keys, n=3)
            raise ConfigError(
                f"unknown key {key!r}{_did_you_mean(close)}; keys at {where}: {', '.join(keys)}", field=key
            )


def replace_path(obj: T, path: str, value: Any) -> T:
    """A copy of config ``obj`` with the field at dotted ``path`` set to ``value`` (re-validated).

    Args:
        obj: A dataclass instance.
        path: Dotted field path, e.g. ``"optim.lr_generator"`` or ``"rewards.0.weight"``.
        value: The new value (plain data or a dataclass instance for a nested config).

    Returns:
        The new instance; every level is rebuilt, so cross-field validation runs again.

    Raises:
        ConfigError: On an unknown path or an invalid value.
    """
    if not _is_dataclass_instance(obj):
        raise TypeError(f"replace_path needs a dataclass instance, got {type(obj).__name__}")
    segments = path.split(".")
    if not all(segments):
        raise ConfigError(f"invalid dotted path {path!r}")
    types_ = _resolve(type(obj), segments)
    data = to_dict(obj)
    _set_in(data, segments, value, path, types_)
    return from_dict(type(obj), data)


# --------------------------------------------------------------------------------------------------
# Documentation.
# --------------------------------------------------------------------------------------------------


_NO_DEFAULT = object()


def _field_default(f: dataclasses.Field, parent_default: Any) -> Any:
    """The field's effective default: taken from the parent's default instance when there is one,
    so that e.g. ``student.lora.rank`` shows the student's default, not ``LoraSpec``'s."""
    if parent_default is not _NO_DEFAULT:
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def _describe_into(cls: type, prefix: str, lines: list[str], width: int, defaults: Any) -> None:
    hints = _hints(cls)
    for f in _init_fields(cls):
        path = _join(prefix, f.name)
        tp = hints[f.name]
        default = _field_default(f, defaults)
        help_text = f.metadata.get("help", "(no help)")
        if _is_dataclass_type(tp):
            lines.append(f"{path}: [{tp.__name__}]")
        else:
            shown = "(required)" if default is _NO_DEFAULT else json.dumps(to_dict(default))
            lines.append(f"{path}: {_type_name(tp)} = {shown}")  # JSON is valid YAML
        lines.extend(textwrap.wrap(help_text, width, initial_indent="    ", subsequent_indent="    "))
        inner = _strip_optional(tp)
        if _is_dataclass_type(inner):
            nested = default if isinstance(default, inner) else _NO_DEFAULT
            _describe_into(inner, path, lines, width, nested)
        elif get_origin(inner) is tuple and _is_dataclass_type(next(iter(get_args(inner)), None)):
            _describe_into(get_args(inner)[0], _join(path, "N"), lines, width, _NO_DEFAULT)


def describe(cls: type, *, width: int = 100) -> str:
    """Every field of config ``cls``, recursively, with type, default and help text.

    Each field is listed by the dotted key that ``--set`` takes (list items as ``key.N.field``).

    Args:
        cls: A config dataclass type.
        width: Wrap width of the help text.

    Returns:
        Multi-line text for ``dmdr-fast train --help-config``.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"describe needs a dataclass type, got {cls!r}")
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{cls.__name__}: {doc[0]}" if doc else cls.__name__, ""]
    _describe_into(cls, "", lines, width, _NO_DEFAULT)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Mixin.
# --------------------------------------------------------------------------------------------------


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
