"""Config sections → algo/models objects (dmdr_fast.train.components)."""

from __future__ import annotations

import pytest

from dmdr_fast.algo import DynaDG, DynaRS, GuidanceScale
from dmdr_fast.config import ConfigError, DMDRConfig, LoraSpec, StudentConfig
from dmdr_fast.models.lora import LoraConfig
from dmdr_fast.train.components import guidance_scale, lora_config, real_score_schedule, renoise_schedule


def test_conversions_to_algo_and_lora_objects():
    d = DMDRConfig(dynamic_horizon=100, renoise="uniform", guidance=4.0, guidance_jitter=0.5)
    assert renoise_schedule(d) == DynaRS(horizon=100, a=4.0, b=1.5, mode="uniform", t_min=0.001)
    assert real_score_schedule(d) == DynaDG(scale0=0.75, horizon=100)
    assert guidance_scale(d) == GuidanceScale(scale=4.0, jitter=0.5)
    spec = StudentConfig().lora
    assert lora_config(spec, "student", ["x"]) == LoraConfig(
        targets=("x",), rank=64, alpha=128.0, adapter="student"
    )
    assert lora_config(LoraSpec(targets=("y",)), default_targets=["x"]).targets == ("y",)
    with pytest.raises(ConfigError, match=r"^LoraSpec\.targets: is empty"):
        lora_config(spec)
