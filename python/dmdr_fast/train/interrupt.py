"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step, save, say how to resume.

:func:`fit` runs ``Trainer.fit`` with handlers for both signals. The first signal only records a
request; ``Trainer.fit`` checks :func:`stop_requested` after each generator step — the same point
where periodic checkpoints are written, so the resumed run continues exactly as an uninterrupted
one would — leaves its loop and writes its final checkpoint; :func:`fit` then raises
:class:`TrainingInterrupted` with that checkpoint, which the CLI reports (where it is, the exact
command that resumes) before exiting 130. A second signal stops at once with ``KeyboardInterrupt``
(nothing saved beyond the last periodic checkpoint), for a step that takes too long.

Only a single-process run is handled so: under torchrun each rank could see the signal at a
different step and leave the collective operations of the others waiting, so there the signals
keep their default behaviour (torchrun stops all ranks).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dmdr_fast.train import checkpoint as ckpt

__all__ = ["EXIT_CODE", "TrainingInterrupted", "fit", "graceful_stop", "resume_command", "stop_requested"]

#: The exit code of a run stopped by a signal (the shell's 128 + SIGINT).
EXIT_CODE = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The name of the signal received inside the active :func:`graceful_stop` block, if any (module
#: state because a signal handler has no other way to reach the training loop).
_received: list[str] = []


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        step: The generator step the run stopped at.
        checkpoint: The checkpoint written at that step (None without an output folder).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no output folder, nothing saved"
        super().__init__(f"{signal_name}: stopped at generator step {step}; {where}")


def stop_requested() -> bool:
    """Whether a signal asked the running :func:`graceful_stop` block to stop."""
    return bool(_received)


def _handler(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _received:  # the second signal: the user does not want to wait for the step
        raise KeyboardInterrupt
    _received.append(name)
    print(
        f"\n{name}: stopping after the current step and saving a checkpoint "
        "(send it again to stop at once, without saving)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def graceful_stop(enabled: bool = True) -> Iterator[list[str]]:
    """Within the block, SIGINT/SIGTERM set :func:`stop_requested` instead of stopping the process.

    Args:
        enabled: False: a no-op (the signals keep their behaviour).

    Yields:
        A list that holds the name of the signal received, if one was (read it after the block).
    """
    got: list[str] = []
    # signal.signal works only in the main thread; elsewhere (a notebook's worker thread, a
    # test runner's) the caller keeps the default behaviour.
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    _received.clear()
    for sig in _SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield got
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        got.extend(_received)
        _received.clear()


def fit(trainer: Any, *, progress: bool = True) -> None:
    """``trainer.fit()`` that a signal stops cleanly (single-process runs; see the module doc).

    ``trainer`` is a :class:`~dmdr_fast.train.trainer.Trainer` (not imported: the Trainer imports
    this module for :func:`stop_requested`).

    Raises:
        TrainingInterrupted: After the checkpoint of the step the signal stopped at was written.
    """
    with graceful_stop(enabled=trainer.world == 1) as got:
        trainer.fit(progress=progress)
    if got:
        found = ckpt.latest_checkpoint(trainer.out_dir) if trainer.out_dir is not None else None
        raise TrainingInterrupted(got[0], trainer.state.gen_step, found)


def resume_command(argv: Sequence[str], prog: str = "dmdr-fast") -> str:
    """The command line that continues the run ``argv`` started: ``--overwrite`` dropped (it would
    delete what was just saved), ``--resume`` added."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([prog, *args])
