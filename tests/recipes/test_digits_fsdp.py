"""The digits main job under FSDP (2 gloo ranks, as torchrun starts it): evaluation during training,
the monitor, the final evaluation and the report run in the same job, on every rank's forwards,
and give what one process gives from the same sharded checkpoint (docs/parallel.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
from tests.test_cli import TINY
from tests.utils import assert_close_tree

from dmdr_fast.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: str, cache: str, *extra: str) -> list[str]:
    args = ["train", "--preset", "digits", "--out", out, "--cache-dir", cache, "--quiet"]
    for kv in [*TINY, "train.checkpoint_every=0", "monitor.every=2", *extra]:
        args += ["--set", kv]
    return args


def _worker(rank: int, port: int, out: str, cache: str) -> None:
    import torch

    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    assert main(_args(out, cache, "train.parallel=fsdp")) == 0


@pytest.mark.slow
def test_digits_under_fsdp_evaluates_and_reports_in_the_run(tmp_path):
    import torch.multiprocessing as mp

    out, cache = tmp_path / "fsdp", tmp_path / "cache"
    mp.spawn(_worker, args=(_free_port(), str(out), str(cache)), nprocs=2, join=True)
    assert (out / "report.md").is_file() and (out / "teacher_vs_student.png").is_file()
    got = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in got["history"]] == [2, 4]  # the evaluator ran under FSDP
    assert [row["step"] for row in got["monitor"]] == [2, 4]  # and the monitor

    # One process resuming the final sharded checkpoint: nothing left to train, the same student.
    single = tmp_path / "single"
    shutil.copytree(out / "checkpoints", single / "checkpoints")
    assert main([*_args(str(single), str(cache), "train.grad_accum=2"), "--resume"]) == 0  # same global batch
    expected = json.loads((single / "metrics.json").read_text())
    # The same student weights; the metrics to float rounding (reductions summed in another order
    # under another thread count).
    for key in ("results", "history", "monitor"):
        assert_close_tree(got[key], expected[key], rel=1e-6, path=key)
