"""Mistakes a user can fix (a path, an argument value), and the checks that find them early.

The CLI prints a :class:`UserError` as one line and exits 2, without a traceback: the message has
to say everything — which argument or path, what is wrong, what would be accepted. The checks
here run before any slow work (loading a model, training a teacher), so that a typo costs
nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "OneLineParser",
    "UserError",
    "bug_report",
    "cfg_scale",
    "check_device",
    "check_writable_file",
    "check_writable_folder",
    "int_in",
]


class UserError(Exception):
    """A mistake in what the user gave (an argument, a path); its message names it and says what
    would be accepted. The CLI prints it in one line and exits 2."""


def _probe_write(folder: Path, what: str) -> None:
    """Create and delete a temporary file in ``folder``: the only test that also covers read-only
    mounts, full disks and root (for whom ``os.access`` says yes to everything)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None


def check_writable_folder(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """``path`` as an output folder that exists afterwards and can be written to.

    Args:
        path: The folder (created, with its parents, if missing).
        what: The argument that named it, for the message.

    Raises:
        UserError: Empty path, an existing file, or a folder that cannot be created or written.
    """
    if not os.fspath(path).strip():
        raise UserError(f"{what}: empty path; give a folder, e.g. {what} runs/x")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, a read-only mount, no permission
        raise UserError(f"{what} {folder}: cannot create the folder ({err.strerror or err})") from None
    _probe_write(folder, f"{what} {folder}")
    return folder


def check_writable_file(
    path: str | os.PathLike[str], what: str = "--out", suffixes: tuple[str, ...] = ()
) -> Path:
    """``path`` as an output file whose folder exists and can be written to (nothing is created).

    Args:
        path: The file to be written.
        what: The argument that named it, for the message.
        suffixes: Accepted file endings (``(".png", ".npz")``); empty: any.

    Raises:
        UserError: Empty path, an existing folder, a missing or unwritable parent folder, or a
            suffix not in ``suffixes``.
    """
    if not os.fspath(path).strip():
        raise UserError(f"{what}: empty path; give a file name")
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{what} {file}: is a folder; give a file name")
    if suffixes and file.suffix.lower() not in suffixes:
        raise UserError(f"{what} {file}: expected a file ending in {' or '.join(suffixes)}")
    parent = file.parent
    if not parent.is_dir():
        state = "is a file" if parent.exists() else "does not exist"
        raise UserError(f"{what} {file}: its folder {parent} {state}")
    _probe_write(parent, f"{what} {file}")
    return file


def check_device(name: str, what: str = "--device") -> str:
    """``name`` as a device this machine has: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: Another name, or CUDA asked for where there is none (or not that index).
    """
    import re

    import torch

    text = name.strip().lower()
    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise UserError(f"{what} {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"{what} {name}: CUDA is not available ({why}); use cpu or auto")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"{what} {name}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
        )
    return text


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low`` (and ``<= high``), else argparse's error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def cfg_scale(text: str) -> float:
    """An argparse ``type``: a CFG scale, ``>= 1``, or 1 or 0 for no CFG (as ``dmdr.guidance``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value == 0 or value >= 1):
        raise argparse.ArgumentTypeError(f"must be >= 1 (CFG scale), or 1 or 0 for no CFG, got {value:g}")
    return value


cfg_scale.__name__ = "CFG scale"  # argparse names the type in some messages


def bug_report(exc: BaseException, prog: str = "dmdr-fast") -> str:
    """What the CLI prints for an unexpected error: its first line, and how to report it."""
    what = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"{prog}: unexpected error: {type(exc).__name__}: {what}\nthis is a bug: rerun with --debug for "
        f"the traceback; report the command, the traceback and the output of `{prog} env`"
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: message (see prog --help)``), exit 2, and
    a ``--debug`` flag on every command (subcommands are built with the parser's class).

    argparse's own error prints the whole usage first, which for ``sample`` is a dozen lines
    above the one that says what is wrong.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's unset flag must not overwrite the one given before it.
        self.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of an unexpected error",
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
