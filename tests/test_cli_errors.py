"""Ordinary mistakes on the command line: one line naming the argument or field, exit 2, before any
slow work (issue 17, item 4). Each case runs `dmdr-fast` in a fresh process, as a user would.

"Before any slow work" is checked by the cache folder: a digits command that got as far as the
teacher would create it (loading or training the teacher and classifiers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tests.train.test_run_dir import tiny_train

from dmdr_fast.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, prefix: tuple[str, ...] = ("-m", "dmdr_fast.cli")) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *prefix, *args], capture_output=True, text=True, timeout=120, env=ENV
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The single stderr line of a refused command, checked for its exit code and ``needles``."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run("train", "--preset", "digits", "--out", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), "--quiet", *args)  # fmt: skip


# -------------------------------------------------------------------------------------- train


def test_a_misspelt_preset_suggests_the_close_name(tmp_path):
    proc = run("train", "--preset", "digitz", "--out", str(tmp_path / "run"))
    one_line_error(proc, "unknown preset 'digitz'", "did you mean 'digits'?")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    one_line_error(train(tmp_path, "--set", "train.device=cuda"), "train.device", "CUDA is not available")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_unknown_attention_backend(tmp_path):
    line = one_line_error(train(tmp_path, "--set", "train.attention=flash"), "train.attention", "'flash'")
    assert "sdpa" in line  # says what would be accepted
    assert not (tmp_path / "cache").exists()


def test_cuda_kernel_backend_on_a_cpu_run(tmp_path):
    proc = train(tmp_path, "--set", "train.device=cpu", "--set", "train.kernel_backend=cuda")
    one_line_error(proc, "train.kernel_backend", "'cuda'", "runs on ['cuda']", "cpu")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bad", ["empty", "file"])
def test_out_must_be_a_folder(tmp_path, bad):
    (tmp_path / "f.txt").write_text("not a folder")
    target = "" if bad == "empty" else str(tmp_path / "f.txt")
    proc = run("train", "--preset", "digits", "--out", target, "--cache-dir", str(tmp_path / "cache"),
               "--set", "train.device=cpu")  # fmt: skip
    one_line_error(proc, "--out", "empty path" if bad == "empty" else "is a file, not a folder")
    assert (tmp_path / "f.txt").read_text() == "not a folder"
    assert not (tmp_path / "cache").exists()


def test_read_only_out(tmp_path):
    target = _read_only_folder(tmp_path) / "run"
    proc = run("train", "--preset", "digits", "--out", str(target), "--cache-dir", str(tmp_path / "cache"),
               "--set", "train.device=cpu")  # fmt: skip
    one_line_error(proc, f"--out {target}: cannot")  # create the folder / write in it
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a disk that fills up for real); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_a_checkpoint(tmp_path, small_disk):
    """The tiny run's checkpoints are ~0.65 MB: step 2's fits on 1 MiB, step 4's does not."""
    out = small_disk / "run"
    proc = run(*tiny_train(out, tmp_path / "cache", "--set", "train.sample_every=0"))
    line = one_line_error(proc, f"no space left on {out / 'checkpoints'} writing step_0000004.pt")
    assert "needs about" in line and "latest is still step_0000002.pt" in line
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000002.pt"]  # no partial file
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["state"]["gen_step"] == 2


# ------------------------------------------------------------------------------------- sample


def sample(tmp_path: Path, checkpoint: Path | str, *args: str, out: str | None = None):
    out = str(tmp_path / "s.png") if out is None else out
    return run("sample", "--checkpoint", str(checkpoint), "--out", out, "--cache-dir", str(tmp_path / "cache"),
               *args)  # fmt: skip


@pytest.fixture
def torch_file(tmp_path) -> Path:
    """A complete torch file that looks like a checkpoint (the argument checks come first)."""
    path = tmp_path / "c.pt"
    torch.save({"format": ckpt.FORMAT, "student": {"w": torch.zeros(1000)}}, path)
    return path


def test_sample_missing_checkpoint(tmp_path):
    one_line_error(sample(tmp_path, tmp_path / "nope.pt"), "--checkpoint", "nope.pt", "no such file")
    assert not (tmp_path / "cache").exists()


def test_eval_missing_checkpoint(tmp_path):
    proc = run("eval", "--checkpoint", str(tmp_path / "nope.pt"), "--cache-dir", str(tmp_path / "cache"))
    one_line_error(proc, "--checkpoint", "no such file")
    assert not (tmp_path / "cache").exists()


def test_sample_empty_checkpoint(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    one_line_error(sample(tmp_path, tmp_path / "e.pt"), "--checkpoint", "is empty (0 bytes)")


def test_sample_truncated_checkpoint(tmp_path, torch_file):
    data = torch_file.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    one_line_error(sample(tmp_path, tmp_path / "t.pt"), "--checkpoint", "t.pt", "truncated or damaged")
    assert not (tmp_path / "cache").exists()


def test_sample_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "w.pt")
    one_line_error(sample(tmp_path, tmp_path / "w.pt"), "--checkpoint", "not a dmdr_fast checkpoint")


def test_sample_a_folder_names_its_latest_checkpoint(tmp_path, torch_file):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch_file.rename(run_dir / "checkpoints" / "step_0000004.pt")
    (run_dir / "checkpoints" / "latest").write_text("step_0000004.pt\n")
    for folder in (run_dir, run_dir / "checkpoints"):
        line = one_line_error(sample(tmp_path, folder), "--checkpoint", "is a folder")
        assert line.endswith(f"its latest checkpoint is {run_dir / 'checkpoints' / 'step_0000004.pt'}")
    (tmp_path / "other").mkdir()
    line = one_line_error(sample(tmp_path, tmp_path / "other"), "is a folder, not a checkpoint file")
    assert "latest" not in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--steps", "0"), "argument --steps: must be >= 1, got 0"),
        (("--num", "0"), "argument --num: must be >= 1, got 0"),
        (("--num", "-1"), "argument --num: must be >= 1, got -1"),
        (("--label", "11"), "argument --label: must be from 0 to 9, got 11"),
        (("--steps", "two"), "argument --steps: expected an integer, got 'two'"),
    ],
    ids=["steps0", "num0", "num-1", "label11", "steps-text"],
)
def test_sample_bad_numbers(tmp_path, torch_file, args, needle):
    line = one_line_error(sample(tmp_path, torch_file, *args), needle)
    assert line.startswith("dmdr-fast sample: error:") and line.endswith("(see dmdr-fast sample --help)")
    assert not (tmp_path / "cache").exists()


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod for a normal user; for root (who ignores
    permission bits), the read-only /sys if it is one."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder for root here")


@pytest.mark.parametrize("case", ["missing-folder", "parent-is-a-file", "a-folder", "suffix", "read-only"])
def test_sample_unwritable_out(tmp_path, torch_file, case):
    (tmp_path / "f.txt").write_text("x")
    out, needle = {
        "missing-folder": (tmp_path / "no" / "s.png", "does not exist"),
        "parent-is-a-file": (tmp_path / "f.txt" / "s.png", "is a file"),
        "a-folder": (tmp_path, "is a folder"),
        "suffix": (tmp_path / "s.gif", "expected a file ending in .png or .jpg or .jpeg or .webp or .npz"),
        "read-only": (None, "cannot write in"),
    }[case]
    if out is None:
        out = _read_only_folder(tmp_path) / "s.png"
    one_line_error(sample(tmp_path, torch_file, out=str(out)), "--out", needle)
    assert not (tmp_path / "cache").exists()  # refused before the checkpoint was even loaded


# ---------------------------------------------------------------------------- unexpected errors

BUG = """
import sys
import dmdr_fast.cli as cli

def broken(args):
    raise RuntimeError("internal state is inconsistent\\nsecond line of detail")

cli._cmd_env = broken  # `dmdr-fast env` now hits a bug
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_unexpected_error_is_one_line_and_how_to_report_it():
    proc = run("env", prefix=("-c", BUG))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "dmdr-fast: unexpected error: RuntimeError: internal state is inconsistent"
    assert len(lines) == 2 and "--debug" in lines[1] and "report" in lines[1]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_keeps_the_traceback(where):
    args = ("--debug", "env") if where == "before" else ("env", "--debug")
    proc = run(*args, prefix=("-c", BUG))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "second line of detail" in proc.stderr
