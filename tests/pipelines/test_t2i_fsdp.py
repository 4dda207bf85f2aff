"""FSDP2 on a text-to-image family: a tiny random SD3 pipeline with a LoRA student and a LoRA
critic (the sd3-medium-4step recipe), with gradient checkpointing or torch.compile on, trains on 2
gloo ranks to the weights of 1 process with 2 micro-batches (docs/parallel.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests.train.test_fsdp import full_weights

from dmdr_fast.configs import load_preset
from dmdr_fast.pipelines.random import save_random_pipeline

PROMPTS = ["a red cat", "a blue dog", "a green car", "an old tree", "a tall house"]
TINY = [
    "model.kwargs.resolution=16",
    "model.kwargs.max_sequence_length=4",
    "model.weights_dtype=fp32",
    "model.vae_slicing=false",
    "rewards=[]",
    "student.num_steps=2",
    "dmdr.dynamic_horizon=2",
    "dmdr.ratio_update=2",
    "train.max_steps=2",
    "dmdr.cold_start_steps=2",
    "train.batch_size=2",
    "train.device=cpu",
    "train.precision=fp32",
    "train.deterministic=true",
    "train.log_every=1",
    "train.sample_every=0",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
    "monitor.every=0",
]
COMBOS = {
    "checkpointing": ["model.gradient_checkpointing=true"],
    "compile": [
        "model.gradient_checkpointing=false",
        "train.compile=true",
        "train.compile_backend=aot_eager",
    ],
}


def _trainer(pipe: str, overrides: list[str]):
    from dmdr_fast.data.prompts import PromptBatch
    from dmdr_fast.recipes.t2i import EncodedPromptSampler, build_adapter
    from dmdr_fast.train import Trainer

    config = load_preset("sd3-medium-4step", [*TINY, *overrides, f"model.path={pipe}"])
    adapter = build_adapter(config.model, device="cpu")
    batch = PromptBatch(prompts=PROMPTS, condition=adapter.encode_condition(PROMPTS))
    return Trainer(config, adapter, data=EncodedPromptSampler(batch))


def _worker(rank: int, init: str, out: str, pipe: str, combo: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        tr = _trainer(pipe, [*COMBOS[combo], "train.parallel=fsdp"])
        tr.fit(progress=False)
        weights = full_weights(tr)
        if rank == 0:
            torch.save(weights, os.path.join(out, f"{combo}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_sd3_lora_under_fsdp_equals_one_process(tmp_path: Path, combo: str):
    import torch.multiprocessing as mp

    pipe = str(save_random_pipeline("sd3", "tiny", tmp_path / "sd3"))
    reference = _trainer(pipe, [*COMBOS[combo], "train.grad_accum=2"])
    start = full_weights(reference)
    reference.fit(progress=False)
    expected = full_weights(reference)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), pipe, combo), nprocs=2, join=True)
    got = torch.load(tmp_path / f"{combo}.pt")
    assert got.keys() == expected.keys() and any(k.startswith("student.") for k in got)
    for group in ("student", "critic"):
        keys = [k for k in expected if k.startswith(group + ".")]
        diff = torch.cat([(got[k] - expected[k]).flatten() for k in keys]).norm()
        moved = torch.cat([(expected[k] - start[k]).flatten() for k in keys]).norm()
        # as tests/train/test_fsdp.py::_close: only the order of the gradient sums differs
        assert moved > 0 and diff <= 1e-3 * moved, f"{combo} {group}: |diff| {diff:.3g}, |moved| {moved:.3g}"
