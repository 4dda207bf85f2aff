"""``dmdr-fast bench step`` in the group-relative modes: both sides run and report finite times,
and the Flow-GRPO-style baseline computes the same on-policy update as our batched step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dmdr_fast.benchmarks.bench_step_rl import advantage_weighted_iteration, flow_grpo_iteration
from dmdr_fast.cli import main
from dmdr_fast.configs import load_preset
from dmdr_fast.recipes.digits.run import bench_trainer

TINY = ["--cycles", "1", "--warmup", "0", "--preset", "digits-grpo", "--set", "train.device=cpu",
        "--set", "train.batch_size=4", "--set", "rl.group_size=2", "--set", "dmdr.ratio_update=2"]  # fmt: skip


GRPO = "flow-grpo"
CASES = [  # (--set overrides, the baseline's name)
    ([], GRPO),
    (["rl.regularizer=kl"], GRPO),
    (["rl.regularizer=dm", "student.num_steps=2"], GRPO),
    (["rl.regularizer=dmd", "student.num_steps=2", "dmdr.guidance=2.0", "dmdr.decoupled=true"], GRPO),
    (["rl.algorithm=advantage_weighted", "dmdr.decoupled=true", "dmdr.guidance=2.0"], "paper+scores"),
]


@pytest.mark.parametrize("sets, baseline", CASES)
def test_bench_step_rl_reports_both_sides(capsys, tmp_path, sets, baseline):
    extra = [a for kv in sets for a in ("--set", kv)]
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY, *extra, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"baseline: {baseline}" in text and f"{baseline} " in text.split("cycle (R")[1]
    r = json.loads(out.read_text())
    assert r["baseline"] == baseline and r["rl"]
    for key in ("ours_cycle", "paper_cycle", "ours_gen", "paper_gen"):
        assert math.isfinite(r["median_ms"][key]) and r["median_ms"][key] > 0
    assert math.isfinite(r["speedup_cycle"]) and r["speedup_cycle"] > 0


def _twin(num_steps: int):
    overrides = [
        "train.device=cpu", "train.batch_size=8", "rl.group_size=4", "rl.passes=1", "rl.regularizer=none",
        "dmdr.ratio_update=1", "dmdr.cold_start_steps=0", "train.tensorboard=false",
        f"student.num_steps={num_steps}",
    ]  # fmt: skip
    return bench_trainer(load_preset("digits-grpo", overrides))


def _trainable(tr) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.student.network.named_parameters() if p.requires_grad}


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in d.values()])


@pytest.mark.parametrize("num_steps", [1, 2])
def test_flow_grpo_baseline_makes_our_on_policy_update(num_steps):
    """From identical Trainers (same weights, optimisers, RNG), one baseline iteration and one of
    ours with passes=1 and no regulariser take the same on-policy policy-gradient step: the same
    rollout (same draws in the same order), the same scores and advantages, the same gradient
    (N per-step backwards accumulated vs one batched backward) and hence the same weight update."""
    ours, base = _twin(num_steps), _twin(num_steps)
    assert torch.equal(_flat(_trainable(ours)), _flat(_trainable(base)))
    w0 = _trainable(ours)
    metrics = ours.step()
    flow_grpo_iteration(base)
    assert metrics is not None and metrics["adv_abs"] > 0  # a real (nonzero) policy gradient
    assert ours.state.step == base.state.step == 1 and ours.state.gen_step == base.state.gen_step == 1
    grads = [
        torch.cat([p.grad.flatten() for p in tr.student.network.parameters() if p.requires_grad])
        for tr in (ours, base)
    ]
    assert grads[0].norm() > 0
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6 * float(grads[0].abs().max()))
    d_ours = _flat(_trainable(ours)) - _flat(w0)
    d_base = _flat(_trainable(base)) - _flat(w0)
    assert torch.nn.functional.cosine_similarity(d_ours, d_base, dim=0) > 0.99
    # the critic updates agree as well (same rollout, same draws)
    lora = [
        torch.cat([p.detach().flatten() for p in tr.guidance.network.parameters() if p.requires_grad])
        for tr in (ours, base)
    ]
    torch.testing.assert_close(lora[1], lora[0], rtol=1e-4, atol=1e-6)


def _aw_twin(num_steps: int):
    overrides = [
        "train.device=cpu", "train.batch_size=8", "rl.group_size=4", "rl.algorithm=advantage_weighted",
        "rl.ca_scale=1.0", "dmdr.decoupled=true", "dmdr.guidance=2.0", "dmdr.ratio_update=1",
        "dmdr.cold_start_steps=0", "train.tensorboard=false", f"student.num_steps={num_steps}",
    ]  # fmt: skip
    return bench_trainer(load_preset("digits-grpo", overrides))


@pytest.mark.parametrize("num_steps", [1, 2])
def test_advantage_weighted_baseline_makes_our_update(num_steps):
    """Mode 2: the paper's Decoupled iteration with the eager CA weights gives our gradient."""
    ours, base = _aw_twin(num_steps), _aw_twin(num_steps)
    metrics = ours.step()
    advantage_weighted_iteration(base)
    assert metrics is not None and metrics["ca_w_max"] > 1  # the weights really differ from 1
    grads = [
        torch.cat([p.grad.flatten() for p in tr.student.network.parameters() if p.requires_grad])
        for tr in (ours, base)
    ]
    assert grads[0].norm() > 0
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6 * float(grads[0].abs().max()))
