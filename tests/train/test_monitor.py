"""The reward-hacking monitor: its rule on synthetic histories, its measurement, and its life in the Trainer."""

from __future__ import annotations

import math

import pytest
import torch

from dmdr_fast.config import DMDRTrainerConfig, MonitorConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.rewards import ClassifierReward, CompositeReward, RewardSpec
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train.monitor import RewardHackingMonitor, mean_pairwise_distance

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def _feed(monitor, rows, active=True):
    return [monitor.update(10 * (i + 1), r, active=active) for i, r in enumerate(rows)]


def test_warns_after_patience_suspicious_evaluations_in_a_row():
    m = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=3, diversity_tol=0.01))
    rows = [
        {"train_reward": 0.0, "heldout": 1.0, "diversity": 1.0},
        {"train_reward": 0.1, "heldout": 1.1, "diversity": 0.9},  # suspicious (diversity)
        {"train_reward": 0.2, "heldout": 1.0, "diversity": 0.9},  # suspicious (held-out)
        {"train_reward": 0.3, "heldout": 1.1, "diversity": 0.8},  # suspicious → 3rd in a row: warn
        {"train_reward": 0.3, "heldout": 1.1, "diversity": 0.7},  # reward flat: streak resets
    ]
    out = _feed(m, rows)
    assert out[:3] == [None, None, None] and out[4] is None
    assert "step 40" in out[3] and "diversity 0.9→0.8" in out[3]
    assert [r["streak"] for r in m.history] == [0, 1, 2, 3, 0]
    assert m.first_flag_step == 40 and "WARNED from step 40" in m.verdict()


def _collapse(n=60, recover_at=None):
    """A reward-only run in numbers: the reward rises and diversity falls for 4 evaluations, then
    both stay flat (collapsed: nothing changes, so nothing is suspicious by the step-to-step rule);
    from ``recover_at`` on, diversity is back at its starting level."""
    rows = [{"train_reward": 0.0, "heldout": 1.0, "diversity": 1.0}]
    rows += [{"train_reward": 0.1 * i, "heldout": 1.0, "diversity": 1.0 - 0.2 * i} for i in range(1, 5)]
    rows += [{"train_reward": 0.4, "heldout": 1.0, "diversity": 0.2} for _ in range(5, n)]
    if recover_at is not None:
        rows[recover_at:] = [{"train_reward": 0.4, "heldout": 1.0, "diversity": 1.0}] * (n - recover_at)
    return rows


def test_a_run_that_stays_collapsed_stays_warned(tmp_path):
    m = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=3))
    _feed(m, _collapse())
    # The 3rd suspicious evaluation in a row (step 40) warns; the 56 flat ones after it are not
    # suspicious any more (the streak resets) but are still far below the pre-streak diversity.
    assert m.first_flag_step == 40 and sum(int(r["flag"]) for r in m.history) == 2  # steps 40, 50
    assert m.collapsed_after_warning == (57, 57)
    assert m.verdict() == (
        "WARNED from step 40, still collapsed: 57 of the 57 evaluations from then on look collapsed "
        "(diversity worse than at step 10); 60 evaluations"
    )
    assert "collapsed" not in m.history[2] and m.history[-1]["collapsed"] == 1.0
    from dmdr_fast.eval.plots import plot_monitor

    assert plot_monitor({"reward only": m.history}, tmp_path / "m.png").stat().st_size > 0  # marks them


def test_a_run_that_recovers_says_so_and_the_state_survives_a_checkpoint():
    m = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=3))
    _feed(m, _collapse(n=20, recover_at=10))
    assert m.collapsed_after_warning == (7, 17)  # steps 40..100 collapsed, 110..200 recovered
    assert "WARNED from step 40, recovered: 7 of the 17" in m.verdict()
    # Resume mid-collapse: the baseline and its signals come back with the state.
    a = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=3))
    rows = _collapse(n=20, recover_at=10)
    _feed(a, rows[:6])
    b = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=3))
    b.load_state_dict(a.state_dict())
    for i, r in enumerate(rows[6:], start=6):
        b.update(10 * (i + 1), r)
    assert b.verdict() == m.verdict() and b.history == m.history
    # A state saved before the collapse tracking existed still loads.
    old = {k: v for k, v in a.state_dict().items() if k in ("history", "warnings", "streak")}
    RewardHackingMonitor(torch.arange(2)).load_state_dict(old)


def test_small_changes_within_tolerance_do_not_count():
    m = RewardHackingMonitor(
        torch.arange(2), config=MonitorConfig(patience=1, diversity_tol=0.05, heldout_tol=0.1)
    )
    rows = [{"train_reward": 0.0, "heldout": 1.0, "diversity": 1.0}]
    rows += [
        {"train_reward": 0.1 * i, "heldout": 1.0 - 0.01 * i, "diversity": 1.0 - 0.01 * i} for i in range(1, 4)
    ]
    assert _feed(m, rows) == [None] * 4
    assert m.verdict().startswith("no warning")


def test_inactive_evaluations_never_count_and_missing_reward_is_never_suspicious():
    m = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=1))
    rows = [{"train_reward": float(i), "diversity": 1.0 / (i + 1)} for i in range(4)]
    assert _feed(m, rows, active=False) == [None] * 4
    m2 = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=1))
    assert _feed(m2, [{"diversity": 1.0}, {"diversity": 0.5}]) == [None, None]


def test_mean_pairwise_distance_matches_brute_force():
    torch.manual_seed(0)
    f = torch.randn(3 * 4, 5)
    want = []
    for g in range(3):
        block = f[4 * g : 4 * g + 4].double()
        want += [(block[i] - block[j]).norm() for i in range(4) for j in range(4) if i != j]
    assert mean_pairwise_distance(f, 3) == pytest.approx(float(torch.stack(want).mean()), rel=1e-12)
    assert mean_pairwise_distance(torch.ones(6, 3), 2) == 0.0  # collapsed: no diversity


def test_state_dict_round_trip():
    m = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=2))
    _feed(m, [{"train_reward": 0.0, "diversity": 1.0}, {"train_reward": 1.0, "diversity": 0.5}])
    m2 = RewardHackingMonitor(torch.arange(2), config=MonitorConfig(patience=2))
    m2.load_state_dict(m.state_dict())
    assert m2.update(30, {"train_reward": 2.0, "diversity": 0.2}) is not None  # the streak survived


def _trainer(tmp_path=None, every=1):
    torch.manual_seed(0)  # the same reward and held-out networks in every call
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    heldout_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 4, "batch_size": 4, "tensorboard": False, "device": "cpu", "log_every": 1,
                      "sample_every": 0, "eval_every": 0, "checkpoint_every": 2, "deterministic": True},
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 1, "cold_start_steps": 1},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 1},
            "rewards": [{"kind": "classifier", "name": "clf", "weight": 0.5}],
            "monitor": {"every": every, "samples_per_condition": 3},
        }
    )  # fmt: skip
    monitor = RewardHackingMonitor(
        torch.arange(4),
        heldout=ClassifierReward(heldout_net, spec=RewardSpec("heldout"), num_classes=10, in_channels=1),
    )
    reward = CompositeReward(
        [ClassifierReward(clf, spec=RewardSpec("clf", weight=0.5), num_classes=10, in_channels=1)]
    )
    return Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), reward=reward, data=ClassLabelSampler(10),
        out_dir=tmp_path, monitor=monitor,
    )  # fmt: skip


def test_trainer_runs_the_monitor_and_resumes_it(tmp_path):
    from dmdr_fast.train.logging import read_jsonl

    tr = _trainer(tmp_path / "a")
    assert tr.monitor.config == tr.config.monitor  # the Trainer's config applies
    tr.fit(max_steps=4, progress=False)
    hist = tr.monitor.history
    assert [int(r["step"]) for r in hist] == [1, 2, 3, 4]
    for r in hist:
        assert {"train_reward", "heldout", "diversity"} <= r.keys()
        assert math.isfinite(r["diversity"]) and r["diversity"] > 0
    assert "cosine" not in hist[0] and "cosine" in hist[1]  # the reward acts from step 2 (stage 2)
    logged = [row for row in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "monitor/diversity" in row]
    assert len(logged) == 4

    tr2 = _trainer(tmp_path / "b")
    tr2.fit(max_steps=2, progress=False)
    tr3 = _trainer(tmp_path / "b")
    assert tr3.resume()
    tr3.fit(max_steps=4, progress=False)
    for a, b in zip(tr3.monitor.history, hist, strict=True):
        assert a == pytest.approx(b)


def test_bad_settings_are_refused():
    from dmdr_fast.config import ConfigError, RewardConfig

    with pytest.raises(ConfigError, match="patience"):
        MonitorConfig(patience=0)
    with pytest.raises(ConfigError, match="samples_per_condition"):
        MonitorConfig(samples_per_condition=1)
    with pytest.raises(ConfigError, match="diversity_tol"):
        MonitorConfig(diversity_tol=-0.1)
    with pytest.raises(ValueError, match="held-out condition"):
        RewardHackingMonitor(torch.arange(0))
    with pytest.raises(ConfigError, match="ratio"):
        RewardConfig(ratio=-1.0)
    with pytest.raises(ConfigError, match="max_weight"):
        RewardConfig(max_weight=-1.0)
    with pytest.raises(ConfigError, match="combine"):
        RewardConfig(combine="adaptive")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ratio"):
        RewardConfig(combine="balanced", ratio=float("inf"))
    # The combination policy is configuration only: a reward module does not take it.
    clf = torch.nn.Linear(64, 10)
    with pytest.raises(TypeError, match="combine"):
        ClassifierReward(clf, combine="balanced")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="ratio"):
        ClassifierReward(clf, ratio=0.5)  # type: ignore[call-arg]
