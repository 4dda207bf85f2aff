"""The group-relative modes in the Trainer (``rl.algorithm``; docs/method.md §12, train/rl.py).

What is checked here: groups (K copies of each condition in a row), the advantages reaching the
CA weights of mode 2, GRPO's on-policy first pass equal to the plain policy gradient written out,
each regulariser (DMD, DM, KL, none) training and changing the update, scorers that fail / return
NaN / are slow not stopping a run, and exact resume in both modes (the KL reference included).
"""

from __future__ import annotations

import pytest
import torch
from tests.utils import assert_resume_is_exact

from dmdr_fast.algo import policy_means, transition_logprobs
from dmdr_fast.config import ConfigError, DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.rewards import CallableReward, CompositeReward, RewardSpec
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train.logging import read_jsonl

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def brightness(images, cond):
    return images.mean(dim=(1, 2, 3))


def _config(
    algorithm: str = "grpo", *, num_steps: int = 2, rl=None, dmdr=None, optim=None, **train
) -> DMDRTrainerConfig:
    decoupled = algorithm == "advantage_weighted"
    return DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 0, "eval_every": 0,
                      "checkpoint_every": 2, "tensorboard": False, "device": "cpu", "deterministic": True,
                      **train},
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 2, "guidance": 3.0 if decoupled else 1.0,
                     "decoupled": decoupled, **(dmdr or {})},
            "critic": {"kind": "lora", "lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": num_steps},
            "optim": optim or {},
            "rewards": [{"kind": "callable", "name": "bright", "weight": 1.0}],
            "rl": {"algorithm": algorithm, "group_size": 2, **(rl or {})},
        }
    )  # fmt: skip


def _reward(fn=brightness, name: str = "bright") -> CompositeReward:
    return CompositeReward([CallableReward(fn, spec=RewardSpec(name), differentiable=False)])


def _trainer(cfg, out_dir=None, fn=brightness) -> Trainer:
    return Trainer(
        cfg,
        DiTAdapter(tiny_dit(num_layers=1, seed=0)),
        reward=_reward(fn),
        data=ClassLabelSampler(10),
        out_dir=out_dir,
    )


def _student_params(tr: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.student.network.parameters()]


def test_config_checks():
    with pytest.raises(ValueError, match="divide the world batch"):
        _trainer(_config(rl={"group_size": 3}))
    with pytest.raises(ConfigError, match="group_size"):
        _config(rl={"group_size": 1})
    with pytest.raises(ConfigError, match="decoupled"):
        DMDRTrainerConfig.from_dict(
            {"rewards": [{"kind": "jpeg", "weight": 1.0}], "rl": {"algorithm": "advantage_weighted"},
             "train": {"batch_size": 8}}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="active reward"):
        DMDRTrainerConfig.from_dict({"rl": {"algorithm": "grpo"}, "train": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="regularizer"):
        _config(dmdr={"dmd_weight": 0.0})
    _config(dmdr={"dmd_weight": 0.0}, rl={"regularizer": "none"})  # the unregularised baseline


def test_groups_repeat_each_condition():
    tr = _trainer(_config())
    raw, _ = tr.rl.sample(tr, 4)
    assert torch.equal(raw[0::2], raw[1::2])
    assert tr.rl.groups.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("algorithm", ["grpo", "advantage_weighted"])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_both_modes_train_and_log(algorithm, num_steps):
    tr = _trainer(_config(algorithm, num_steps=num_steps))
    before = _student_params(tr)
    rows = []
    for _ in range(2 * tr.config.dmdr.ratio_update):
        m = tr.step()
        if m is not None:
            rows.append(m)
    assert len(rows) == 2 and tr.state.gen_step == 2
    for m in rows:
        assert m["valid_frac"] == 1.0 and m["reward/bright"] == m["reward/bright"]  # not NaN
        assert "loss_dmd" in m
        if algorithm == "grpo":
            assert abs(m["ratio"] - 1.0) < 1e-5, "the first pass is on-policy"
            assert "ratio_last" in m and "loss_pg" in m
        else:
            assert m["ca_w_max"] >= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.network.parameters(), strict=True))


def test_grpo_first_pass_is_the_policy_gradient():
    """With no regulariser and one pass, the student's gradient is −mean_b A_b·∇ Σ_k log π / (N·D)."""
    cfg = _config(rl={"regularizer": "none", "passes": 1}, optim={"grad_clip": 0.0})
    tr = _trainer(cfg)
    captured = {}
    real_step = tr.opt_g.step

    def capture():
        captured["grads"] = [p.grad.clone() for p in tr.student.network.parameters() if p.requires_grad]
        real_step()

    tr.opt_g.step = capture
    orig_score = tr.rl.score

    def spy(trainer, x, raw):
        out = orig_score(trainer, x, raw)
        captured["adv"], captured["valid"] = out[0], out[1]
        return out

    tr.rl.score = spy
    import dmdr_fast.train.rl as rl_mod

    orig_rollout = rl_mod.policy_rollout

    def keep(*a, **k):
        captured["rollout"], captured["cond"] = orig_rollout(*a, **k), a[2]
        return captured["rollout"]

    rl_mod.policy_rollout = keep
    try:
        while tr.step() is None:
            pass
    finally:
        rl_mod.policy_rollout = orig_rollout
    # The student has moved: recompute on a fresh Trainer, whose weights are the ones the rollout saw.
    ref = _trainer(cfg)
    ro = captured["rollout"]
    _, means = policy_means(ref.student.velocity, ro, captured["cond"])
    logp = transition_logprobs(ro, means, out_std=cfg.rl.sde_noise)
    N, D = logp.shape[0], ro.output[0].numel()
    adv = captured["adv"]
    objective = -(adv[None] * logp).sum() / (N * adv.numel() * D)
    params = [p for p in ref.student.network.parameters() if p.requires_grad]
    expected = torch.autograd.grad(objective, params)
    for got, want in zip(captured["grads"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("regularizer", ["dmd", "dm", "kl", "none"])
def test_each_regulariser_trains(regularizer):
    tr = _trainer(_config(rl={"regularizer": regularizer}, max_steps=2))
    tr.fit(progress=False)
    assert tr.state.gen_step == 2
    if regularizer == "kl":
        assert tr.rl.reference is not None
    else:
        assert tr.rl.reference is None


def test_regulariser_changes_the_update():
    def final(reg):
        tr = _trainer(_config(rl={"regularizer": reg}, max_steps=1))
        tr.fit(progress=False)
        return torch.cat([p.detach().flatten() for p in tr.student.network.parameters()])

    assert not torch.equal(final("dmd"), final("none"))


def test_failing_nan_and_slow_scorers_do_not_stop_a_run(tmp_path):
    calls = {"n": 0}

    def flaky(images, cond):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("judge timed out")
        s = images.mean(dim=(1, 2, 3)).clone()
        s[0] = float("nan")
        return s

    tr = _trainer(_config(max_steps=3), out_dir=tmp_path, fn=flaky)
    tr.fit(progress=False)
    assert tr.state.gen_step == 3
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "valid_frac" in r]
    assert len(rows) == 3
    assert "scorer problems" in (tmp_path / "notes.txt").read_text()
    for r in rows:
        assert r["valid_frac"] < 1.0
    for p in tr.student.network.parameters():
        assert torch.isfinite(p).all()


def test_a_scorer_that_always_fails_leaves_only_the_regulariser(tmp_path):
    def broken(images, cond):
        raise ValueError("no")

    tr = _trainer(_config(max_steps=1), fn=broken)
    tr.fit(progress=False)
    for p in tr.student.network.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "algorithm,rl", [("grpo", {"regularizer": "kl"}), ("grpo", {}), ("advantage_weighted", {})]
)
def test_resume_is_exact(tmp_path, algorithm, rl):
    cfg = _config(algorithm, rl=rl, dmdr={"cold_start_steps": 1})
    assert_resume_is_exact(lambda c, out_dir=None: _trainer(c, out_dir), cfg, tmp_path)


def test_a_yaml_scorer_by_module_and_function_trains():
    """The README's custom-scorer example: ``kind: callable`` with ``kwargs.fn: "module:function"``."""
    from dmdr_fast.rewards import rewards_from_config
    from dmdr_fast.rewards.registry import resolve_callable

    cfg = _config(max_steps=1).with_overrides(
        ["rewards=[{kind: callable, name: bright, weight: 1.0, "
         "kwargs: {fn: 'tests.train.test_rl_trainer:brightness', differentiable: false}}]"]
    )  # fmt: skip
    reward = rewards_from_config(cfg.rewards)
    tr = Trainer(cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), reward=reward, data=ClassLabelSampler(10))
    tr.fit(progress=False)
    assert tr.state.gen_step == 1
    for bad, match in [("nocolon", "module:function"), ("no_such_mod_x:f", "cannot import"),
                       ("tests.train.test_rl_trainer:nope", "no attribute")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            resolve_callable(bad)


def _rl_ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import os

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        # 2 samples per rank, groups of 4: every group spans both ranks.
        tr = _trainer(_config(rl={"group_size": 4}, batch_size=2, max_steps=2, checkpoint_every=0))
        seen = []
        orig = tr.rl.score

        def spy(trainer, x, raw):
            adv, valid, m = orig(trainer, x, raw)
            seen.append({"x": x.detach().clone(), "raw": raw.clone(), "groups": tr.rl.groups.clone(),
                         "adv": adv.clone(), "step": trainer.state.step})  # fmt: skip
            return adv, valid, m

        tr.rl.score = spy
        tr.fit(progress=False)
        flat = torch.cat([p.detach().flatten() for p in tr.student.network.parameters()])
        torch.save({"seen": seen, "params": flat}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_groups_span_ranks_with_exact_statistics(tmp_path):
    """Two gloo processes, groups of 4 over 2 + 2 samples: each rank's advantages are those of the
    whole world batch computed in one process; the conditions are those one process with the world
    batch draws; the ranks' students stay identical."""
    import torch.multiprocessing as mp

    from dmdr_fast.algo import group_advantages

    mp.spawn(_rl_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["params"], r1["params"])
    assert len(r0["seen"]) == 2
    single = _trainer(_config(rl={"group_size": 4}, batch_size=4))
    for a, b in zip(r0["seen"], r1["seen"], strict=True):
        assert torch.equal(torch.cat([a["groups"], b["groups"]]), torch.tensor([0, 0, 0, 0]))
        # The shared condition draw depends on the iteration only; scoring comes after the critic
        # update, which counted the iteration.
        single.state.step = a["step"] - 1
        raw_world, _ = single.rl.sample(single, 4)
        assert torch.equal(torch.cat([a["raw"], b["raw"]]), raw_world)
        x = torch.cat([a["x"], b["x"]])
        scores = brightness(single.student.decode(x), None)
        adv, _ = group_advantages(scores, torch.zeros(4, dtype=torch.int64), clip=5.0)
        torch.testing.assert_close(torch.cat([a["adv"], b["adv"]]), adv)
        assert adv.abs().sum() > 0
