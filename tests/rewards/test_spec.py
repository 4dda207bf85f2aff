"""RewardSpec: validation naming the field, built from a config entry once, taken whole by every reward."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from dmdr_fast.config import RewardConfig
from dmdr_fast.rewards import CallableReward, ClassifierReward, Reward, RewardSpec
from dmdr_fast.rewards.spec import config_field, spec_fields


def test_defaults_and_numbers_stored_as_floats():
    spec = RewardSpec("r")
    assert (spec.name, spec.weight, spec.loss_form, spec.margin, spec.prompt_prefix) == (
        "r",
        1.0,
        "neg",
        0.0,
        "",
    )
    spec = RewardSpec("r", weight=2, margin=1)
    assert type(spec.weight) is float and type(spec.margin) is float
    assert spec == RewardSpec("r", weight=2.0, margin=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weight = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"name": 3}, "name"),
        ({"weight": math.nan}, "weight"),
        ({"weight": math.inf}, "weight"),
        ({"weight": "0.5"}, "weight"),
        ({"weight": True}, "weight"),
        ({"loss_form": "square"}, "loss_form"),
        ({"margin": math.nan}, "margin"),
        ({"margin": None}, "margin"),
        ({"prompt_prefix": None}, "prompt_prefix"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"RewardSpec\.{field} "):
        RewardSpec(**{"name": "r", **kwargs})


def test_every_field_has_its_config_counterpart():
    """Adding a shared option = a RewardSpec field + the same-named RewardConfig field."""
    config_fields = {f.name for f in dataclasses.fields(RewardConfig)}
    assert set(spec_fields()) == {f.name for f in dataclasses.fields(RewardSpec)}
    for field in spec_fields():
        assert config_field(field) in config_fields, f"RewardConfig has no field for RewardSpec.{field}"
    assert config_field("loss_form") == "form"


def test_from_config_reads_every_field():
    cfg = RewardConfig(
        kind="hps", name="h", weight=0.3, form="hinge", margin=0.6, prompt_prefix="Realistic photo ",
        combine="balanced", ratio=0.5, max_weight=2.0, path="x",
    )  # fmt: skip
    assert RewardSpec.from_config(cfg) == RewardSpec(
        "h", weight=0.3, loss_form="hinge", margin=0.6, prompt_prefix="Realistic photo "
    )
    # No name: the kind (the key by which the Trainer finds the entry again).
    assert RewardSpec.from_config(RewardConfig(kind="clip", weight=0.1)).name == "clip"
    # RewardConfig's defaults (margin 0.7) carry over as they are.
    assert RewardSpec.from_config(RewardConfig()) == RewardSpec("classifier", weight=0.05, margin=0.7)


def test_split_separates_the_spec_fields():
    spec, rest = RewardSpec.split({"weight": 0.5, "scale": 2.0, "name": None}, default_name="k")
    assert spec == RewardSpec("k", weight=0.5) and rest == {"scale": 2.0}


def test_every_reward_takes_the_spec_whole():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    spec = RewardSpec("c", weight=0.5, loss_form="hinge", margin=0.9)
    reward = ClassifierReward(clf, spec=spec, mode="prob")
    assert reward.spec is spec and reward.name == "c"
    assert ClassifierReward(clf).spec == RewardSpec("classifier")  # the class's default name
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(reward.loss(x, y), 0.5 * torch.relu(0.9 - reward(x, y)))
    assert "spec=RewardSpec(name='c'" in repr(reward)
    with pytest.raises(TypeError, match="spec must be a RewardSpec"):
        ClassifierReward(clf, spec={"name": "c"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # the old keywords are gone
        ClassifierReward(clf, name="c", weight=0.5)  # type: ignore[call-arg]
    for gone in ("weight", "loss_form", "margin", "prompt_prefix", "combine", "ratio", "max_weight"):
        assert not hasattr(reward, gone), gone  # read them from reward.spec; policy is the config's

    class Bare(Reward):  # no default name: a spec is required
        def score(self, images, cond):
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(TypeError, match=r"Bare needs spec=RewardSpec"):
        Bare()
    assert Bare(spec=RewardSpec("b")).name == "b"
    assert CallableReward(lambda im, c: im.mean(dim=(1, 2, 3)), spec=RewardSpec("f")).name == "f"


def test_rewards_import_neither_config_nor_train():
    code = textwrap.dedent(
        """
        import sys
        import dmdr_fast.rewards
        bad = [m for m in sys.modules if m.startswith(("dmdr_fast.config", "dmdr_fast.train"))]
        assert not bad, bad
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
