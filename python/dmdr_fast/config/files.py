"""Config files and paths: YAML read/write, ``--set a.b=value`` overrides, and ``describe``.

- :func:`load_yaml` / :func:`save_yaml` read and atomically write YAML files. YAML is read with a
  safe loader that also takes ``1e-8`` and ``2.5e3`` as floats (YAML 1.1, which PyYAML implements,
  would read them as strings).
- :func:`apply_overrides` applies ``--set``-style strings such as ``"student.num_steps=4"`` or
  ``"student.lora.targets=[to_q, to_v]"``; :func:`replace_path` sets one dotted path from Python.
- :func:`describe` lists every field with its type, default and help text.

Unknown keys are refused with the valid keys and a "did you mean" suggestion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from dmdr_fast._io import atomic_write_text
from dmdr_fast.config.engine import (
    ConfigError,
    _coerce,
    _did_you_mean,
    _hints,
    _init_fields,
    _is_dataclass_instance,
    _is_dataclass_type,
    _is_mapping_type,
    _join,
    _show,
    _strip_optional,
    _type_name,
    from_dict,
    to_dict,
)

__all__ = [
    "apply_overrides",
    "describe",
    "load_yaml",
    "parse_override",
    "read_yaml",
    "replace_path",
    "save_yaml",
]

T = TypeVar("T")

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
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, text)  # readable like any other new file (the umask), not mkstemp's 0600
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
    if not is_config:
        return data
    assert cls is not None  # taken from base above
    return from_dict(cls, data)


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
