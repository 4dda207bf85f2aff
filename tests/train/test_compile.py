"""``train.compile``: the Trainer's networks under torch.compile train like the eager ones."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train import checkpoint as ckpt

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def _config(steps: int, adam_eps: float = 1e-8, **train) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "train": {
                "max_steps": steps, "batch_size": 4, "device": "cpu", "tensorboard": False,
                "sample_every": 0, "checkpoint_every": 0, "log_every": 1, **train,
            },
            # DynaDG anneals λ_r every step and CFG adds the unconditional pass: the scalar LoRA
            # scales and the batch sizes change between calls, which must not recompile each step.
            "dmdr": {"dynamic_horizon": 8, "ratio_update": 2, "guidance": 2.0},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 2},
            "optim": {"adam_eps": adam_eps},
        }
    )  # fmt: skip


def _trainer(cfg: DMDRTrainerConfig, out_dir=None) -> Trainer:
    return Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10), out_dir=out_dir
    )


def _trained(cfg: DMDRTrainerConfig) -> list[torch.Tensor]:
    tr = _trainer(cfg)
    tr.fit(progress=False)
    return [p.detach().clone() for p in tr.student.network.parameters()]


def test_graph_capture_is_exact_and_does_not_recompile_every_step(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    eager = _trained(_config(4))
    tr = _trainer(_config(4, compile=True, compile_backend="aot_eager"), out_dir=tmp_path)
    tr.fit(2, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    tr.fit(4, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs > 0  # steps 3-4: no new graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled = [p.detach() for p in tr.student.network.parameters()]
    # Sampling (no grad, other batch sizes) adds variants of the same code object: all of them
    # must stay under the raised recompile limit, past which dynamo would silently run eager.
    for n in (3, 5):
        tr.sample(torch.arange(n))
    assert torch._dynamo.config.recompile_limit >= 64
    assert counters["stats"]["unique_graphs"] < torch._dynamo.config.recompile_limit
    # aot_eager runs the same ATen ops as eager: the same bits.
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    # Checkpoints and the export see plain module names; the exported copy is not compiled.
    path = tr.save()
    names = set(ckpt.load_checkpoint(path)["student"])
    assert names == set(ckpt.trainable_state(tr.student.network)) and not any("_orig_mod" in n for n in names)
    exported = tr.export_student()
    assert exported._compiled_call_impl is None


def test_inductor_matches_eager_to_float_tolerance():
    torch._dynamo.reset()
    counters.clear()
    # Adam with a large ε (1e-3): an update lr·g/(|g| + ε) that depends smoothly on the gradient,
    # so float32 rounding differences in g (fused/reordered arithmetic) stay tiny in the
    # parameters, while a wrong graph would change the update by its whole size (~lr·|g|/ε).
    initial = [p.detach().clone() for p in tiny_dit(num_layers=1, seed=0).parameters()]
    eager = _trained(_config(1, adam_eps=1e-3))
    compiled = _trained(_config(1, adam_eps=1e-3, compile=True))  # inductor: generated C++ on the CPU
    assert counters["stats"]["unique_graphs"] > 0 and counters["inductor"], "nothing was compiled"
    moved = max(float((a - b).abs().max()) for a, b in zip(eager, initial))
    assert moved > 1e-6
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * moved)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"not a torch\.compile backend"):
        _trainer(_config(1, compile=True, compile_backend="tvm_made_up"))
