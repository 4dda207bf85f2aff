"""FSDP2 on a text-to-image family: a tiny random SD3 pipeline with a LoRA student and a LoRA
critic (the sd3-medium-4step recipe), with gradient checkpointing or torch.compile on, trains on 2
gloo ranks to the weights of 1 process with 2 micro-batches (docs/parallel.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests.train.test_fsdp import full_weights, gloo_rank, save_weights
from tests.utils import assert_close_tree

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
    with gloo_rank(rank, 2, init):
        tr = _trainer(pipe, [*COMBOS[combo], "train.parallel=fsdp"])
        tr.fit(progress=False)
        save_weights(tr, os.path.join(out, f"{combo}.pt"))


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


def _run_worker(rank: int, init: str, out: str, pipe: str, kind: str) -> None:
    from dmdr_fast.recipes.t2i import run_t2i

    with gloo_rank(rank, 2, init):
        run_t2i(_run_config(pipe, kind, "fsdp"), out, progress=False, teacher_steps=2)


def _run_config(pipe: str, kind: str, parallel: str, *extra: str):
    prompts = Path(pipe).parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # monitor.every=1: the reward-hacking monitor samples on every rank under FSDP (a collective)
    sets = [*TINY, "monitor.every=1", f"student.kind={kind}", f"train.parallel={parallel}", *extra]
    return load_preset("sd3-medium-4step", [*sets, f"model.path={pipe}", f"data.prompts={prompts}"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_run_exports_and_reports_like_one_process(tmp_path: Path, kind: str):
    """The recipe under FSDP on 2 ranks exports in-run (the student gathered onto rank 0) and writes
    its report; the export equals, tensor for tensor, the one a single process writes after
    resuming the same sharded checkpoint (the old way to finish an FSDP run)."""
    import json
    import shutil

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from dmdr_fast.recipes.t2i import run_t2i

    pipe = str(save_random_pipeline("sd3", "tiny", tmp_path / "sd3"))
    out = tmp_path / "fsdp"
    mp.spawn(_run_worker, args=(str(tmp_path / "init"), str(out), pipe, kind), nprocs=2, join=True)
    assert (out / "report.md").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in metrics["monitor"]] == [1, 2]  # the monitor ran under FSDP

    single = tmp_path / "single"
    shutil.copytree(out / "checkpoints", single / "checkpoints")
    # the same global batch in one process: 2 micro-batches
    one = _run_config(pipe, kind, "ddp", "train.grad_accum=2")
    run_t2i(one, single, resume=True, progress=False, teacher_steps=2)
    name = (
        "pytorch_lora_weights.safetensors"
        if kind == "lora"
        else "transformer/diffusion_pytorch_model.safetensors"
    )
    got, expected = load_file(out / "export" / name), load_file(single / "export" / name)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    info = [json.loads((d / "export" / "dmdr_export.json").read_text()) for d in (out, single)]
    assert info[0] == info[1]
    # The comparison images were drawn from the same weights: the same scores, to float rounding
    # (the one process's thread count sums the metrics' reductions in another order).
    expected_cmp = json.loads((single / "metrics.json").read_text())["comparison"]
    assert_close_tree(metrics["comparison"], expected_cmp, rel=1e-6)
