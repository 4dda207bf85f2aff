"""The output folder of a training run: one run per folder, one process per run.

``dmdr-fast train --out DIR`` claims ``DIR`` with :func:`claim` before any slow work:

- a folder that already holds a run (checkpoints, a config, logs, a report) is refused unless the
  user says what to do with it: ``--resume`` continues it, ``--overwrite`` deletes the run's own
  outputs (listed in the message; other files in the folder are kept) and starts over;
- a lock file (:data:`LOCK_NAME`) held with ``flock`` for the whole run keeps a second process out
  of the folder; it records the holder's pid for the refusal message. The kernel drops the lock
  when its process dies however it dies, so a lock file left by a killed run is simply taken over
  (and said so) — no pid liveness guessing, no race between two processes taking it over;
- partial checkpoint files that an interrupted write left behind (the hidden ``.step_*.tmp`` and
  ``.latest.*.tmp``, each as large as a checkpoint) are removed once the lock is held, when no
  other process can be writing them.

POSIX only (``fcntl``), like the rest of the training stack's tested platforms. On a network file
system ``flock`` may not lock across machines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from dmdr_fast._errors import UserError, check_writable_folder
from dmdr_fast.train import checkpoint as ckpt

__all__ = [
    "LOCK_NAME",
    "RUN_OUTPUTS",
    "RunDirError",
    "RunLock",
    "claim",
    "remove_partial_checkpoints",
    "say_resumed",
]

LOCK_NAME = ".dmdr-fast.lock"
#: What a training run writes directly under its folder (the Trainer, the digits and text-to-image
#: recipes): exactly what ``--overwrite`` removes.
RUN_OUTPUTS = (
    "checkpoints",
    "samples",
    "tensorboard",
    "export",
    "config.yaml",
    "metrics.jsonl",
    "notes.txt",
    "metrics.json",
    "report.md",
    "teacher_vs_student.png",
    "student_per_class.png",
    "metrics_over_steps.png",
    "monitor.png",
)
#: The temporary names of ``_io.atomic_save`` / ``atomic_write_text`` for a checkpoint and ``latest``.
_PARTIAL = re.compile(r"^\.(step_\d+\.pt|latest)\..+\.tmp$")


class RunDirError(UserError):
    """The run folder cannot be used as asked (it holds a run, another process has it, ...)."""


def run_outputs(folder: Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` present in ``folder`` (an empty ``checkpoints/`` counts not)."""
    found = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if name == "checkpoints" and path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete the partial checkpoint files in ``folder/checkpoints``; returns what was removed.

    Only safe while no process writes checkpoints there: call it with the folder's lock held.
    """
    removed = []
    ckpt_dir = folder / "checkpoints"
    if ckpt_dir.is_dir():
        for path in sorted(ckpt_dir.iterdir()):
            if _PARTIAL.match(path.name) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class RunLock:
    """An exclusive ``flock`` on ``folder/.dmdr-fast.lock`` for as long as it is held.

    Attributes:
        path: The lock file.
        previous_pid: The pid recorded by a process that held the lock before and is gone (its
            run was killed), or None.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.previous_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirError` naming the pid of the process that has it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                pid = _read_pid(self.path)
                who = f"process {pid}" if pid is not None else "another process"
                raise RunDirError(
                    f"--out {self.path.parent}: in use by {who}, which is training there now "
                    f"(lock {self.path}); wait for it, stop it, or choose another --out"
                ) from None
            # The previous holder may have deleted the file between our open and flock (release
            # unlinks it): then we locked an orphan inode, and another process may lock a new
            # file. Only a lock on the file that is at the path counts.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous_pid = _read_pid(self.path)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (unlink first: see :meth:`acquire`)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _describe(folder: Path, found: list[str]) -> str:
    latest = ckpt.latest_checkpoint(folder)
    names = [
        f"checkpoints/ (latest {latest.name})" if name == "checkpoints/" and latest is not None else name
        for name in found
    ]
    return ", ".join(names)


@contextlib.contextmanager
def claim(
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    rank: int | None = None,
    say: Callable[[str], None] = print,
) -> Iterator[Path]:
    """Hold ``out`` as the folder of one training run for the duration of the block.

    Args:
        out: The ``--out`` folder (created if missing).
        resume: ``--resume``: a run in the folder is to be continued.
        overwrite: ``--overwrite``: the run in the folder is deleted first (its outputs only).
        rank: The process's rank under torchrun (default: ``$RANK``, else 0); only rank 0 checks
            and locks (the other ranks of the same run write nothing there and must not be
            refused by rank 0's lock).
        say: Where the notes go (what was taken over or removed).

    Yields:
        The folder.

    Raises:
        RunDirError: Both flags; the folder holds a run and neither flag was given; another live
            process holds the lock.
        UserError: ``out`` is empty, a file, or not writable.
    """
    if resume and overwrite:
        raise RunDirError(
            "--resume and --overwrite: give one (continue the run, or delete it and start over)"
        )
    folder = check_writable_folder(out, "--out")
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) != 0:
        yield folder
        return
    with RunLock(folder) as lock:
        if lock.previous_pid is not None and lock.previous_pid != os.getpid():
            say(f"note: took over the lock of process {lock.previous_pid}, which is no longer running")
        partial = remove_partial_checkpoints(folder)
        if partial:
            say(
                f"note: removed {len(partial)} partial checkpoint file(s) left by an interrupted write in {folder}/checkpoints"
            )
        found = run_outputs(folder)
        if found and not (resume or overwrite):
            raise RunDirError(
                f"--out {folder}: holds a run ({_describe(folder, found)}); add --resume to continue it "
                "or --overwrite to delete it and start over"
            )
        if found and overwrite:
            for name in found:
                path = folder / name.rstrip("/")
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            say(f"--overwrite: removed the previous run in {folder}: {', '.join(found)}")
        if resume and ckpt.latest_checkpoint(folder) is None:
            say(f"--resume: no checkpoint in {folder}/checkpoints; starting at step 0")
        yield folder


def say_resumed(rank: int, checkpoint: object | None, step: int, out_dir: object, *, quiet: bool) -> None:
    """The one line ``--resume`` prints (stderr, rank 0, not ``quiet``): where it resumed, at which
    generator step — or that ``out_dir`` had no checkpoint and the run starts fresh."""
    if rank != 0 or quiet:
        return
    if checkpoint is None:
        print(f"--resume: no checkpoint in {out_dir}, starting fresh", file=sys.stderr, flush=True)
    else:
        print(f"resumed from {checkpoint} at generator step {step}", file=sys.stderr, flush=True)
