"""SIGINT/SIGTERM during `dmdr-fast train`: the step finishes, a checkpoint is written, the message
says where it is and the exact command that resumes; exit 130, no traceback (train/interrupt.py)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.train.test_run_dir import ENV, tiny_train

from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train import interrupt
from dmdr_fast.train.run_dir import LOCK_NAME


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupt_cache")


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _interrupted_run(
    out: Path, cache: Path, sig: signal.Signals
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start a long tiny run, send ``sig`` once it has logged 3 generator steps, wait for the end."""
    argv = tiny_train(
        out,
        cache,
        *("--set", "train.max_steps=100000", "--set", "train.checkpoint_every=0"),
        *("--set", "train.eval_every=0", "--set", "train.sample_every=0"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmdr_fast.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 300  # the first run also trains the tiny teacher into the cache
    while len(_logged_steps(out)) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), argv


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, cache, sig):
    out = tmp_path / "run"
    done, argv = _interrupted_run(out, cache, sig)
    assert done.returncode == interrupt.EXIT_CODE, done.stderr
    assert "Traceback" not in done.stderr
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    step = ckpt.load_checkpoint(latest)["state"]["gen_step"]
    # The step running when the signal came was finished, not lost: every logged step is saved.
    assert step >= max(_logged_steps(out)) >= 3
    assert f"{sig.name}: stopped at generator step {step}; checkpoint {latest}" in done.stderr
    resume = [line for line in done.stderr.splitlines() if line.startswith("resume with: ")]
    assert len(resume) == 1
    assert shlex.split(resume[0].removeprefix("resume with: ")) == ["dmdr-fast", *argv, "--resume"]
    assert not (out / LOCK_NAME).exists()  # the run folder is free again

    if sig is signal.SIGINT:
        # The printed command resumes (given a nearer end, to finish in seconds).
        cmd = shlex.split(resume[0].removeprefix("resume with: "))[1:]
        cmd += ["--set", f"train.max_steps={step + 2}"]
        proc = subprocess.run(
            [sys.executable, "-m", "dmdr_fast.cli", *cmd],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"at generator step {step}" in (out / "notes.txt").read_text()
        assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["state"]["gen_step"] == step + 2


def test_graceful_stop_records_the_first_signal_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupt.graceful_stop() as got:
        assert not interrupt.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert interrupt.stop_requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        pytest.fail("the second signal did not stop the block")
    assert got == ["SIGTERM"]
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.stop_requested()


def test_graceful_stop_disabled_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.graceful_stop(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before


def test_resume_command_drops_overwrite_and_adds_resume_once():
    assert (
        interrupt.resume_command(["train", "--out", "a b", "--overwrite"])
        == "dmdr-fast train --out 'a b' --resume"
    )
    assert interrupt.resume_command(["train", "--resume"]) == "dmdr-fast train --resume"


def test_ctrl_c_before_training_is_one_line_and_frees_the_folder(tmp_path):
    """Ctrl-C while the (default-size) teacher trains: nothing to save; no traceback, exit 130."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmdr_fast.cli", "train", "--preset", "digits", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--quiet", "--set", "train.device=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():  # the folder is claimed: the slow work starts now
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # seen once in a loaded CI run, not reproduced: say where it hung
        pytest.fail(f"no exit 60 s after SIGINT; where it was:\n{_stacks(proc)}")
    assert proc.returncode == interrupt.EXIT_CODE, stderr[-2000:]
    assert stderr.strip() == "dmdr-fast: interrupted"
    assert not (out / LOCK_NAME).exists()


def _stacks(proc: subprocess.Popen) -> str:
    """The Python stacks of a hung ``python -m dmdr_fast.cli`` (gdb's py-bt needs symbols we may not
    have; faulthandler via SIGABRT prints every thread's stack to stderr), then it is gone."""
    proc.send_signal(signal.SIGABRT)
    try:
        _, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return stderr[-6000:]
