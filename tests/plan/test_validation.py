"""The planner against measured peaks of real CPU Trainer runs (docs/plan.md §3).

States (weights, gradients, AdamW moments, EMA) must match exactly; the total per-run peak within
20 %. The peaks are live tensor-storage bytes (:class:`dmdr_fast.plan.measure.LiveTensorBytes`):
exact and deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from measured import config, measure

from dmdr_fast.plan.measure import LiveTensorBytes


def test_the_tracker_sees_allocations_and_frees():
    with LiveTensorBytes() as m:
        a = torch.empty(1000, 250)  # 1 MB
        b = a * 2
        del b
        assert m.sweep() == 10**6 and m.peak == 2 * 10**6
        del a
        assert m.sweep() == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"batch": 16},
        {"batch": 16, "precision": "bf16"},
        {"batch": 24, "checkpointing": True, "backward_sim": "final"},
        {"batch": 16, "student": "lora", "backward_sim": "final"},
        {"batch": 8, "ema": 0.99},
        {"batch": 24, "precision": "bf16", "checkpointing": True, "backward_sim": "final"},
        {"batch": 24, "precision": "bf16", "checkpointing": True, "student": "lora", "backward_sim": "final"},
        {"batch": 8, "precision": "bf16", "checkpointing": True, "backward_sim": "final"},
        {"batch": 8, "checkpointing": True, "backward_sim": "final"},
        {"batch": 16, "checkpointing": True, "backward_sim": "trajectory"},
    ],
    ids=[
        "fp32",
        "bf16",
        "checkpointing",
        "lora-final",
        "ema",
        "bf16-ckpt",
        "lora-bf16-ckpt",
        "bf16-ckpt-b8",
        "ckpt-b8",
        "ckpt-trajectory",
    ],
)
def test_estimate_is_within_20_percent_of_the_measured_peak(kw):
    r = measure(config(kw.pop("batch"), **kw))
    assert r.estimate_states == r.objects  # weights + gradients + AdamW + EMA: exact
    assert 0 <= r.states - r.objects < 256  # + a few 0-dim loss scalars the Trainer keeps to log
    error = r.estimate / r.peak - 1
    act_error = r.estimate_activations / r.activations - 1
    print(
        f"{kw}: peak {r.peak / 2**20:.2f} MiB, estimate {r.estimate / 2**20:.2f} MiB ({100 * error:+.1f} %); activations {r.activations / 2**20:.2f} MiB, estimate {r.estimate_activations / 2**20:.2f} MiB ({100 * act_error:+.1f} %)"
    )
    assert abs(error) < 0.20
