"""The digits-grpo preset and ``dmdr-fast experiment digits-grpo`` on tiny settings (seconds each)."""

from __future__ import annotations

import json

import pytest
from tests.test_cli import TINY

from dmdr_fast.cli import main

GRPO_TINY = [*TINY, "rl.group_size=4"]


def _sets(extra=()):
    out = []
    for kv in [*GRPO_TINY, *extra]:
        out += ["--set", kv]
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["rl.regularizer=kl"],
        ["rl.algorithm=advantage_weighted", "dmdr.decoupled=true", "dmdr.guidance=2.0"],
    ],
    ids=["grpo-dmd", "grpo-kl", "advantage-weighted"],
)
def test_digits_grpo_trains_from_the_cli(tmp_path, extra):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "--preset", "digits-grpo", "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    assert main([*args, *_sets(extra)]) == 0
    rows = _rows(out)
    stage2 = [r for r in rows if r.get("stage") == 2]
    assert stage2 and all("reward/ink" in r and r["valid_frac"] == 1.0 for r in stage2)
    if not extra or "kl" in extra[0]:
        assert all("loss_pg" in r and "ratio" in r for r in stage2)
    else:
        assert all("ca_w_max" in r for r in stage2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all("ink" in row for row in metrics["results"].values())
    # Exact resume is tested on the Trainer (tests/train/test_rl_trainer.py); here: the CLI continues.
    assert main([*args, "--resume", *_sets([*extra, "train.max_steps=6"])]) == 0
    assert max(r["step"] for r in _rows(out)) == 6


def test_experiment_digits_grpo_tabulates_every_row(tmp_path, capsys):
    out, cache = tmp_path / "exp", tmp_path / "cache"
    argv = [
        "experiment",
        "digits-grpo",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--quiet",
        "--seeds",
        "30",
    ]
    assert main([*argv, *_sets(["train.eval_every=0", "monitor.every=1"])]) == 0
    table = (out / "table.md").read_text()
    for name in (
        "DMD only",
        "GRPO + DMD",
        "GRPO + KL (β 0.1)",
        "GRPO + KL (β 1)",
        "GRPO, no regulariser",
        "advantage-weighted DDMD",
    ):
        assert f"| {name}" in table, name
    assert (out / "samples.png").is_file() and (out / "curves.png").is_file()
    summary = json.loads((out / "experiment.json").read_text())
    assert set(summary["verdicts"]) >= {"GRPO + DMD", "GRPO, no regulariser"}
    # Every row branched from the one stage-1 checkpoint: its runs start at the cold-start step.
    first = _rows(out / "grpo-dmd-seed30")
    assert min(r["step"] for r in first) == 3  # cold_start_steps = 2: the row's first step is step 3
    assert "stage1-seed30" in {p.name for p in out.iterdir()}
    assert "unknown experiment" not in capsys.readouterr().out
