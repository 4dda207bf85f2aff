"""`sample` / `eval` train nothing; options are honoured or refused, never silently replaced
(issue 17). Each case runs `dmdr-fast` in a fresh process, as a user would."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_cli_errors import ENV, one_line_error, run
from tests.train.test_run_dir import tiny_train


def cli(*args: str, env: dict[str, str] | None = None, umask: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmdr_fast.cli", *args], capture_output=True, text=True, timeout=300,
        env=env or ENV, umask=umask,
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, cache) of one finished tiny digits run, trained with umask 022."""
    root = tmp_path_factory.mktemp("digits")
    proc = cli(*tiny_train(root / "run", root / "cache"), umask=0o022)
    assert proc.returncode == 0, proc.stderr
    return root / "run" / "checkpoints" / "step_0000004.pt", root / "cache"


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the last stderr line (libraries' import notes may come before it,
    e.g. transformers without torchvision) holding ``needles``."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dmdr-fast") and all(n in line for n in needles), line
    return line


def _teachers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("digits_teacher-*")) if cache.is_dir() else []


def test_sample_trains_no_teacher(digits_run, tmp_path):
    """Before: a teacher missing from the cache was trained (minutes) and cached, then sampled."""
    checkpoint, cache = digits_run
    empty = tmp_path / "empty"
    out = tmp_path / "s.npz"
    proc = cli(
        "sample", "--checkpoint", str(checkpoint), "--cache-dir", str(empty), "--num", "20", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert not empty.exists()  # nothing trained, nothing cached
    # The same samples as with the run's own cache (where the teacher is): the student is all it takes.
    same = tmp_path / "same.npz"
    proc = cli(
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--cache-dir",
        str(cache),
        "--num",
        "20",
        "--out",
        str(same),
    )
    assert proc.returncode == 0, proc.stderr
    a, b = np.load(out), np.load(same)
    assert a["images"].shape == (20, 1, 8, 8) and np.array_equal(a["images"], b["images"])
    # ... and they are the checkpoint's student's, sampled through the Trainer that trained it.
    from dmdr_fast.cli import _load_trainer

    trainer, _ = _load_trainer(str(checkpoint), str(cache))  # the cached teacher, the full state
    x = trainer.sample(torch.arange(20) % 10, generator=torch.Generator().manual_seed(0))
    expected = trainer.student.decode(x).clamp(0, 1).numpy()
    assert np.allclose(a["images"], expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_samples_without_the_teacher(digits_run, tmp_path):
    """An FSDP run's checkpoint folder (DCP shards + META) loads into the sampling Trainer too."""
    from tests.train.test_sharded_checkpoint import _save_sharded

    from dmdr_fast.cli import _load_trainer
    from dmdr_fast.recipes.digits.checkpoints import load_student

    checkpoint, cache = digits_run
    trainer, _ = _load_trainer(str(checkpoint), str(cache))
    folder = _save_sharded(trainer, tmp_path / "run")
    student = load_student(folder, tmp_path / "empty")
    labels = torch.arange(10)
    a = trainer.sample(labels, generator=torch.Generator().manual_seed(0))
    b = student.sample(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not (tmp_path / "empty").exists()


def test_eval_builds_only_the_classifiers(digits_run, tmp_path):
    checkpoint, _ = digits_run
    empty = tmp_path / "empty"
    proc = cli("eval", "--checkpoint", str(checkpoint), "--cache-dir", str(empty), "--num", "20")
    assert proc.returncode == 0, proc.stderr
    assert '"fd"' in proc.stdout and "training the digits classifiers" in proc.stderr
    assert _teachers(empty) == [] and len(list(empty.glob("digits_classifiers-*.pt"))) == 1


def test_sample_lora_student_needs_its_teacher(tmp_path):
    """A LoRA student's frozen base is the teacher: without it in the cache, one line says so."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    lora = ["student.kind=lora", "student.lora.rank=4", 'student.lora.targets=["*attn1.to_q", "*ff.net.2"]']
    proc = cli(
        *tiny_train(run_dir, cache, *[a for s in lora for a in ("--set", s)], "--set", "train.sample_every=0")
    )
    assert proc.returncode == 0, proc.stderr
    checkpoint = run_dir / "checkpoints" / "step_0000004.pt"
    proc = run("sample", "--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "other"),
               "--out", str(tmp_path / "s.png"))  # fmt: skip
    refused(proc, "LoRA on the digits teacher", "not in the cache", "--cache-dir")
    assert not (tmp_path / "other").exists() and not (tmp_path / "s.png").exists()
    proc = run(
        "sample", "--checkpoint", str(checkpoint), "--cache-dir", str(cache), "--out", str(tmp_path / "s.png")
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_device_cuda_is_not_ignored(digits_run, tmp_path):
    checkpoint, cache = digits_run
    proc = run("sample", "--checkpoint", str(checkpoint), "--cache-dir", str(cache), "--device", "cuda",
               "--out", str(tmp_path / "s.png"))  # fmt: skip
    refused(proc, "--device cuda", "CUDA is not available")


def test_sample_jpg_is_jpeg(digits_run, tmp_path):
    checkpoint, cache = digits_run
    out = tmp_path / "s.jpg"
    proc = cli(
        "sample", "--checkpoint", str(checkpoint), "--cache-dir", str(cache), "--num", "10", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).format == "JPEG"  # before: refused, and on the t2i path PNG bytes


@pytest.mark.parametrize("value", ["-2", "0.5"])
def test_guidance_below_one_is_refused(tmp_path, value):
    """Before: any w <= 1 silently meant "no CFG"; the documented off values are 1 (and 0)."""
    proc = run("train", "--preset", "digits", "--out", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), "--set", f"dmdr.guidance={value}")  # fmt: skip
    one_line_error(proc, "dmdr.guidance", "or 1 or 0 for no CFG", f"got {float(value)}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    # The commands' own CFG flags follow the same rule.
    proc = run("ode-pairs", "--preset", "digits", "--guidance", value, "--out", str(tmp_path / "pairs"))
    one_line_error(proc, "argument --guidance: must be >= 1 (CFG scale), or 1 or 0 for no CFG")
    assert not (tmp_path / "pairs").exists()


def test_a_bogus_backend_is_named(tmp_path):
    env = {**ENV, "DMDR_FAST_BACKEND": "bogus"}
    proc = cli("train", "--preset", "digits", "--out", str(tmp_path / "run"), "--cache-dir",
               str(tmp_path / "cache"), "--set", "train.device=cpu", env=env)  # fmt: skip
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "DMDR_FAST_BACKEND='bogus'" in line and "cpp, cuda" in line, proc.stderr
    assert not (tmp_path / "cache").exists()
    code = "import dmdr_fast\nwith dmdr_fast.use_backend('bogus'):\n    pass\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 1 and "unknown backend 'bogus'; valid backends: cpp, cuda" in proc.stderr
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "import dmdr_fast.ops"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert "DMDR_FAST_BACKEND='bogus' is not a backend of any op" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_env_says_no_cuda_backend_without_cuda():
    proc = cli("env")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    cuda_rows = [r for r in rows if len(r) > 3 and r[2] == "cuda" and r[0] in ("dmd_loss", "attention")]
    assert cuda_rows and all(r[3] in ("no:", "-") for r in cuda_rows), cuda_rows  # before: "yes" for triton
    if torch.version.cuda is None:
        assert "is a CPU-only build" in proc.stdout


def test_files_follow_the_umask(digits_run, tmp_path):
    """Checkpoints and cached teachers/classifiers were 0600 (mkstemp) next to a 0644 config.yaml."""
    checkpoint, cache = digits_run
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    run_dir = checkpoint.parent.parent
    files = [checkpoint, checkpoint.parent / "latest", run_dir / "config.yaml", *cache.glob("*.pt")]
    assert len(files) >= 5 and {mode(p) for p in files} == {0o644}, {str(p): oct(mode(p)) for p in files}
    # A stricter umask gives stricter files, config.yaml included.
    proc = cli(*tiny_train(tmp_path / "run", cache, "--set", "train.max_steps=2"), umask=0o077)
    assert proc.returncode == 0, proc.stderr
    strict = [tmp_path / "run" / "config.yaml", tmp_path / "run" / "checkpoints" / "step_0000002.pt"]
    assert {mode(p) for p in strict} == {0o600}


def test_every_sample_flag_has_help():
    from dmdr_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("sample", "eval", "train"):
        missing = [a.option_strings for a in sub[command]._actions if a.option_strings and not a.help]
        assert not missing, (command, missing)
        cache = next(a for a in sub[command]._actions if "--cache-dir" in a.option_strings)
        assert "DMDR_FAST_CACHE" in cache.help
