"""Sharded (DCP) checkpoints in one process: the folder format, its visibility rule, exact resume
and the refusal of a metadata file that would run code (the multi-process cases: test_fsdp.py)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from tests.train.test_fsdp import fsdp_config, full_weights, make

from dmdr_fast._io import UnsafeFileError
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train import sharded


def _save_sharded(tr, out_dir) -> object:
    """What ``Trainer.save`` does under FSDP, here without a process group (DCP's no-dist mode)."""
    plain = {
        k: v for k, v in tr.state_dict().items() if k not in ("student", "critic", "opt_g", "opt_c", "ema")
    }
    tensors, meta = sharded.checkpoint_parts(tr, plain)
    return sharded.save_sharded(out_dir, tr.state.gen_step, tensors, meta, keep=2)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_folder_resumes_exactly_and_is_the_latest(tmp_path):
    full = make(fsdp_config("full"))
    full.fit(progress=False)

    part = make(fsdp_config("full"), tmp_path)
    part.fit(max_steps=2, progress=False)  # writes step_0000002.pt (a file: no FSDP here)
    folder = _save_sharded(part, tmp_path)
    assert folder.name == "step_0000002" and ckpt.is_sharded_checkpoint(folder)
    assert ckpt.latest_checkpoint(tmp_path) == folder
    (tmp_path / "checkpoints" / "step_0000002.pt").unlink()
    del part

    resumed = make(fsdp_config("full"), tmp_path)
    assert resumed.resume() and resumed.state.gen_step == 2
    resumed.fit(progress=False)
    for n, v in full_weights(full).items():
        torch.testing.assert_close(full_weights(resumed)[n], v, rtol=0, atol=0, msg=n)
    meta = ckpt.open_checkpoint(folder)  # what `dmdr-fast sample --checkpoint DIR` reads first
    assert meta["state"]["gen_step"] == 2 and "student" not in meta


def test_incomplete_folders_are_never_the_latest(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step_0000004").mkdir(parents=True)  # shards but no trainer.pt: a killed save
    (folder / "step_0000004" / ".metadata").write_bytes(b"")
    (folder / ".step_0000006.partial").mkdir()
    ckpt.atomic_save({"format": ckpt.FORMAT}, folder / "step_0000002.pt")
    assert ckpt.latest_checkpoint(tmp_path) == folder / "step_0000002.pt"
    (folder / "latest").write_text("step_0000004\n")  # a pointer to an incomplete folder
    assert ckpt.latest_checkpoint(tmp_path) == folder / "step_0000002.pt"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_that_would_run_code_is_refused_before_dcp_reads_it(tmp_path):
    folder = tmp_path / "step_0000001"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    ckpt.atomic_save({"format": ckpt.FORMAT, "sharded_keys": []}, folder / ckpt.META)
    with pytest.raises(UnsafeFileError, match=r"os\.system|posix\.system"):
        sharded.load_into(folder, {})
