"""``dmdr.dynars`` / ``dmdr.dynadg``: each switch turns off its own cold-start strategy and nothing else.

Each switch is checked against the parameter setting that turned the same strategy off before the
switches existed (DynaRS: ``dynars_a = dynars_b = 1``; DynaDG: ``real_scale0 = 0``): the schedules
must agree on every step, and whole Trainer runs must give the same weights bit for bit.
"""

from __future__ import annotations

import torch

from dmdr_fast.config import DMDRConfig, DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train.components import real_score_schedule, renoise_schedule

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]
STEPS = (0, 1, 3, 7, 20)  # inside and past the horizon of 8


def _times(d: DMDRConfig, step: int) -> torch.Tensor:
    return renoise_schedule(d).sample(64, step, generator=torch.Generator().manual_seed(step))


def _scales(d: DMDRConfig) -> list[float]:
    return [real_score_schedule(d).real_scale(s) for s in STEPS]


def test_each_switch_changes_only_its_own_schedule():
    on = DMDRConfig(dynamic_horizon=8)
    assert (on.dynars, on.dynadg) == (True, True)  # the defaults: both strategies on, as before
    rs_off = DMDRConfig(dynamic_horizon=8, dynars=False)
    rs_old = DMDRConfig(dynamic_horizon=8, dynars_a=1, dynars_b=1)
    dg_off = DMDRConfig(dynamic_horizon=8, dynadg=False)
    dg_old = DMDRConfig(dynamic_horizon=8, real_scale0=0)
    for s in STEPS:
        # DynaRS off: the old a = b = 1 draws exactly; DynaDG off leaves the default draws.
        assert torch.equal(_times(rs_off, s), _times(rs_old, s))
        assert torch.equal(_times(dg_off, s), _times(on, s))
        if s < 8:  # the Beta law differs from uniform only before the horizon
            assert not torch.equal(_times(rs_off, s), _times(on, s))
    # DynaDG off: λ_r ≡ 0 as with real_scale0 = 0; DynaRS off keeps the default λ_r(s).
    assert _scales(dg_off) == _scales(dg_old) == [0.0] * len(STEPS)
    assert _scales(rs_off) == _scales(on) and _scales(on)[0] == 0.75
    # Both off = dynamic_horizon 0.
    both = DMDRConfig(dynamic_horizon=8, dynars=False, dynadg=False)
    zero = DMDRConfig(dynamic_horizon=0)
    assert _scales(both) == _scales(zero)
    assert all(torch.equal(_times(both, s), _times(zero, s)) for s in STEPS)


def _fit(**dmdr) -> Trainer:
    cfg = DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 3, "batch_size": 4, "device": "cpu", "tensorboard": False,
                      "sample_every": 0, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
            "dmdr": {"dynamic_horizon": 8, "ratio_update": 2, **dmdr},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 1},
        }
    )  # fmt: skip
    tr = Trainer(cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10))
    tr.fit(progress=False)
    return tr


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.student.network.state_dict().items()}


def _same(a: Trainer, b: Trainer) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_switches_train_exactly_like_the_old_settings():
    default = _fit()
    assert _same(_fit(dynars=False), _fit(dynars_a=1.0, dynars_b=1.0))
    assert _same(_fit(dynadg=False), _fit(real_scale0=0.0))
    assert _same(_fit(dynars=False, dynadg=False), _fit(dynamic_horizon=0))
    # ... and each switch does change the training (so the equalities above are not vacuous).
    assert not _same(_fit(dynars=False), default)
    assert not _same(_fit(dynadg=False), default)
    assert not _same(_fit(dynadg=False), _fit(dynars=False))
