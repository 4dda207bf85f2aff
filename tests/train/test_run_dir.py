"""One run per folder, one process per run (train/run_dir.py), through the API and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.test_cli import TINY

from dmdr_fast.train import run_dir

# One thread per process: these tests start several Python processes on a small shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dmdr-fast ARGS`` in a fresh process (what a user runs), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dmdr_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def tiny_train(out: Path, cache: Path, *extra: str) -> list[str]:
    """The arguments of a seconds-long digits run (tiny teacher and classifiers, 4 steps)."""
    sets = [a for kv in TINY for a in ("--set", kv)]
    return [
        "train",
        "--preset",
        "digits",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--quiet",
        *sets,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, cache) of one finished tiny digits run."""
    root = tmp_path_factory.mktemp("run_dir")
    out, cache = root / "run", root / "cache"
    proc = cli(*tiny_train(out, cache))
    assert proc.returncode == 0, proc.stderr
    return out, cache


def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(trained):
    out, cache = trained
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    jsonl = (out / "metrics.jsonl").read_text()
    proc = cli(*tiny_train(out, cache))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "holds a run" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert "step_0000004.pt" in lines[0]  # says which checkpoint it would lose
    # Nothing was touched, nothing was started.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_text() == jsonl
    assert not (out / run_dir.LOCK_NAME).exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    proc = cli("train", "--preset", "digits", "--out", str(tmp_path / "x"), "--resume", "--overwrite")
    assert proc.returncode == 2 and "--resume and --overwrite" in proc.stderr


def test_overwrite_removes_the_run_it_names_and_keeps_other_files(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step_0000002.pt").write_bytes(b"x")
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "my_notes.md").write_text("mine")
    said = []
    with run_dir.claim(folder, overwrite=True, say=said.append):
        assert (folder / run_dir.LOCK_NAME).is_file()
    assert not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()
    assert (folder / "my_notes.md").read_text() == "mine"
    assert len(said) == 1 and "checkpoints/" in said[0] and "metrics.jsonl" in said[0]
    assert not (folder / run_dir.LOCK_NAME).exists()  # released at the end of the block


def test_overwrite_through_the_cli_starts_over(trained, tmp_path):
    out, cache = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    (copy / "checkpoints" / "step_0000099.pt").write_bytes(b"old")  # a checkpoint of the old run
    proc = cli(*tiny_train(copy, cache, "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite: removed the previous run" in proc.stdout
    assert not (copy / "checkpoints" / "step_0000099.pt").exists()
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_0000004.pt"
    steps = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if '"step": 1,' in line]
    assert len(steps) == 1  # a fresh log, not the old one appended to


HOLD = textwrap.dedent(
    """
    import sys, time
    from dmdr_fast.train.run_dir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_refuses_with_the_pid_and_a_dead_one_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _holder(folder)
    try:
        proc = cli("train", "--preset", "digits", "--out", str(folder), "--set", "train.device=cpu")
        assert proc.returncode == 2
        assert f"in use by process {holder.pid}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        with pytest.raises(run_dir.RunDirError, match=str(holder.pid)):
            run_dir.RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: the holder could not clean up; its lock file (and pid) stay, the lock does not.
    assert (folder / run_dir.LOCK_NAME).read_text().strip() == str(holder.pid)
    said = []
    with run_dir.claim(folder, say=said.append):
        assert (folder / run_dir.LOCK_NAME).read_text().strip() == str(os.getpid())
    assert said == [f"note: took over the lock of process {holder.pid}, which is no longer running"]


def test_other_ranks_do_not_take_the_lock(tmp_path):
    folder = tmp_path / "run"
    with run_dir.claim(folder), run_dir.claim(folder, rank=1):  # rank 1 of the same run
        pass


# ------------------------------------------------------------ partial checkpoint files (item 6)

FAILING_WRITE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import torch
    from dmdr_fast.train import checkpoint as ckpt

    out = Path(sys.argv[1])
    ckpt.save_checkpoint(out, 1, {"w": torch.zeros(1000)}, keep=3)
    # A real failing write, as on a full disk: past RLIMIT_FSIZE the kernel refuses the write
    # (EFBIG) once SIGXFSZ, which would kill the process instead, is ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    try:
        ckpt.save_checkpoint(out, 2, {"w": torch.zeros(1 << 20)}, keep=3)  # 4 MiB > 1 MiB
    except ckpt.CheckpointSpaceError as exc:
        print("write failed:", exc)
    """
)


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 0 and "write failed" in proc.stdout, proc.stderr
    # torch's own error says only "unexpected pos"; ours names the cause, the need and what is kept.
    assert f"file size limit (ulimit -f) reached on {tmp_path / 'checkpoints'}" in proc.stdout
    assert "needs about 4.0 MiB" in proc.stdout and "latest is still step_0000001.pt" in proc.stdout
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000001.pt"]
    assert (folder / "latest").read_text().strip() == "step_0000001.pt"


def _leave_partials(folder: Path) -> list[Path]:
    """What a run killed while writing leaves: a partial checkpoint and a partial pointer."""
    partial = [folder / ".step_0000006.pt.k2j4x9.tmp", folder / ".latest.a8d7f.tmp"]
    for path in partial:
        path.write_bytes(b"\0" * 1000)
    return partial


def test_claim_removes_partial_checkpoint_files_only(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    partial = _leave_partials(folder)
    keep = [folder / "step_0000004.pt", folder / "latest", folder / ".step_notes.tmp", folder / "x.tmp"]
    for path in keep:
        path.write_text("x")
    said = []
    with run_dir.claim(folder.parent, resume=True, say=said.append):
        pass
    assert not any(p.exists() for p in partial)
    assert all(p.exists() for p in keep)
    assert said == [f"note: removed 2 partial checkpoint file(s) left by an interrupted write in {folder}"]


def test_the_next_start_removes_partial_checkpoint_files(trained, tmp_path):
    out, cache = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    partial = _leave_partials(copy / "checkpoints")
    proc = cli(*tiny_train(copy, cache, "--resume"))  # at max_steps already: resumes, saves, reports
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 partial checkpoint file(s)" in proc.stdout
    assert not any(p.exists() for p in partial)
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_0000004.pt"
