"""The dmdr-fast CLI: env, bench, and the digits preset end to end on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dmdr_fast.cli import main

# A digits run that takes seconds: tiny teacher and classifiers, a few DMDR steps.
TINY = [
    "model.kwargs.teacher.model.num_layers=1",
    "model.kwargs.teacher.model.attention_head_dim=8",
    "model.kwargs.teacher.train.steps=30",
    "model.kwargs.teacher.train.batch_size=32",
    "model.kwargs.classifiers.reward.epochs=1",
    "model.kwargs.classifiers.eval.epochs=1",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.eval_every=2",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "train.num_eval_samples=40",
    "train.num_grid_samples=9",
    "train.tensorboard=false",
    "train.log_every=1",
    "train.device=cpu",
    "dmdr.cold_start_steps=2",
    "dmdr.dynamic_horizon=2",
    "dmdr.ratio_update=2",
]


def _sets(extra=()):
    out = []
    for kv in [*TINY, *extra]:
        out += ["--set", kv]
    return out


def test_env(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "dmd_loss" in out and "cpp" in out and "triton" in out


def test_bench_dmd_loss_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc = main(["bench", "dmd-loss", "--shape", "3x2x5x7", "--providers", "eager,torch,cpp", "--reps", "2",
               "--warmup", "1", "--json", str(path)])  # fmt: skip
    assert rc == 0
    result = json.loads(path.read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["vs_eager"] == pytest.approx(1.0)
    assert rows["torch"]["max_abs_err"] < 1e-5
    assert "copy ceiling" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--preset", "digits", "--out", str(tmp_path), "--set", "student.num_steps=9"])
    assert rc == 2
    assert "student.num_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path)])  # neither --preset nor --config


@pytest.mark.slow
def test_digits_preset_end_to_end(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert (
        main(
            ["train", "--preset", "digits", "--out", str(out), "--cache-dir", str(cache), "--quiet", *_sets()]
        )
        == 0
    )
    for name in ("report.md", "metrics.json", "teacher_vs_student.png", "student_per_class.png",
                 "metrics_over_steps.png", "config.yaml", "metrics.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["results"]) == 2 and [h["step"] for h in metrics["history"]] == [2, 4]
    for row in metrics["results"].values():
        assert set(row) >= {"fd", "precision", "recall", "accuracy", "diversity", "reward"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_reward" in r for r in rows) and any(r.get("stage") == 1 for r in rows)

    # Resume: a longer run continues from step 4, not from scratch.
    assert main(["train", "--preset", "digits", "--out", str(out), "--cache-dir", str(cache), "--quiet", "--resume",
                 *_sets(["train.max_steps=6"])]) == 0  # fmt: skip
    notes = (out / "notes.txt").read_text()
    assert "resumed from" in notes and "step 4" in notes

    ckpt = out / "checkpoints" / "step_0000006.pt"
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert (
        main(
            ["sample", "--checkpoint", str(ckpt), "--num", "12", "--out", str(png), "--cache-dir", str(cache)]
        )
        == 0
    )
    assert Image.open(png).size[0] > 0
    assert main(["sample", "--checkpoint", str(ckpt), "--num", "6", "--label", "3", "--steps", "2",
                 "--out", str(npz), "--cache-dir", str(cache)]) == 0  # fmt: skip
    data = np.load(npz)
    assert data["images"].shape == (6, 1, 8, 8) and data["images"].min() >= 0 and data["images"].max() <= 1
    assert (data["labels"] == 3).all()
    # FP8 sampling (linears + attention): the same samples up to FP8 noise.
    npz8 = tmp_path / "s8.npz"
    assert main(["sample", "--checkpoint", str(ckpt), "--num", "6", "--label", "3", "--steps", "2",
                 "--out", str(npz8), "--cache-dir", str(cache), "--fp8"]) == 0  # fmt: skip
    diff = np.abs(np.load(npz8)["images"] - data["images"])
    assert 0 < diff.mean() < 0.05  # pixels in [0, 1]: FP8 moved them, by little
    bench = tmp_path / "bench_sample.json"
    assert main(["bench", "sample", "--checkpoint", str(ckpt), "--batch", "10", "--reps", "1", "--warmup", "0",
                 "--fp8", "--cache-dir", str(cache), "--json", str(bench)]) == 0  # fmt: skip
    sides = json.loads(bench.read_text())["images_per_s"]
    assert set(sides) == {"teacher-50-cfg1", "student", "student-fp8"} and min(sides.values()) > 0
    assert main(["eval", "--checkpoint", str(ckpt), "--num", "20", "--cache-dir", str(cache)]) == 0


def test_bench_step_runs(capsys):
    rc = main(["bench", "step", "--cycles", "1", "--warmup", "0", "--set", "train.batch_size=4",
               "--set", "train.device=cpu", "--set", "dmdr.ratio_update=2"])  # fmt: skip
    assert rc == 0
    assert "paper" in capsys.readouterr().out


def test_bench_step_compiled_has_an_eager_row(capsys, tmp_path):
    out = tmp_path / "step.json"
    rc = main(["bench", "step", "--cycles", "1", "--warmup", "1", "--set", "train.batch_size=2",
               "--set", "train.device=cpu", "--set", "dmdr.ratio_update=1", "--set", "train.compile=true",
               "--set", "train.compile_backend=aot_eager", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert "compiled (aot_eager/default) vs our step eager" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"ours_cycle", "ours_eager_cycle", "paper_cycle"} <= set(result["median_ms"])
    assert result["compile"] == "aot_eager/default"


def test_bench_step_fp8_times_the_unquantised_twin(capsys, tmp_path):
    out = tmp_path / "step.json"
    rc = main(["bench", "step", "--cycles", "1", "--warmup", "0", "--set", "train.batch_size=4",
               "--set", "train.device=cpu", "--set", "dmdr.ratio_update=2",
               "--set", "model.weights_dtype=fp8", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert "FP8 frozen weights vs fp32" in capsys.readouterr().out  # the digits teacher is fp32
    result = json.loads(out.read_text())
    assert {"ours_cycle", "paper_cycle", "ours_fp32_cycle"} <= set(result["median_ms"])
    before, after = result["fp8_frozen_bytes"]
    assert result["weights_dtype"] == "fp8" and 0 < after < before / 3  # fp32 -> e4m3 + scales


def test_bench_step_decoupled(capsys):
    rc = main(["bench", "step", "--cycles", "1", "--warmup", "0", "--set", "train.batch_size=2",
               "--set", "train.device=cpu", "--set", "dmdr.ratio_update=1", "--set", "dmdr.guidance=2",
               "--set", "dmdr.decoupled=true"])  # fmt: skip
    assert rc == 0
    assert "Decoupled DMD (independent)" in capsys.readouterr().out
