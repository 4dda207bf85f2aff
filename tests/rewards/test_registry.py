"""build_reward by kind: built-in kinds, errors that say what to download, registering new kinds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor, nn

from dmdr_fast.rewards import (
    CLIP_HUB_ID,
    PICKSCORE_HUB_ID,
    PICKSCORE_PROCESSOR_HUB_ID,
    REWARD_KINDS,
    CallableReward,
    MissingWeightsError,
    Reward,
    RewardSpec,
    available_reward_kinds,
    build_reward,
    register_reward_kind,
    registry,
)


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the kind table, so that registrations do not leak into other tests."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))


@pytest.fixture
def one_thread():
    """Tiny models on one thread (see ``single_torch_thread`` in test_clip_rewards.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mean_score(images: Tensor, cond) -> Tensor:
    return images.mean(dim=(1, 2, 3))


def test_builtin_kinds_and_unknown_kind():
    assert REWARD_KINDS == (
        "clip",
        "pickscore",
        "aesthetic",
        "callable",
        "hps",
        "image_reward",
        "jpeg",
        "ink",
    )
    jpeg = build_reward("jpeg", direction="incompressibility", weight=0.5)
    assert jpeg.name == "jpeg" and jpeg.spec.weight == 0.5 and jpeg.direction == "incompressibility"
    assert not jpeg.differentiable
    with pytest.raises(
        ValueError, match=r"unknown reward kind 'hpsv3'.*clip, pickscore, aesthetic, callable, hps"
    ):
        build_reward("hpsv3", path="x")
    with pytest.raises(ValueError, match=r"RewardSpec\.loss_form"):
        build_reward("callable", fn=mean_score, loss_form="square")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "source"),
    [
        ("clip", CLIP_HUB_ID),
        ("pickscore", PICKSCORE_HUB_ID),
        ("pickscore", PICKSCORE_PROCESSOR_HUB_ID),
        ("aesthetic", CLIP_HUB_ID),
        ("aesthetic", "improved-aesthetic-predictor"),
    ],
)
def test_model_kinds_without_path_name_the_download(kind, source):
    with pytest.raises(MissingWeightsError, match=re.escape(source)):
        build_reward(kind)


def test_callable_kind():
    reward = build_reward("callable", fn=mean_score, weight=0.5, loss_form="hinge", margin=0.9)
    assert isinstance(reward, CallableReward) and reward.name == "callable"
    assert reward.spec == RewardSpec("callable", weight=0.5, loss_form="hinge", margin=0.9)
    x = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(reward.loss(x, None), 0.5 * torch.relu(0.9 - mean_score(x, None)))
    judge = build_reward("callable", fn=mean_score, name="judge", differentiable=False, prompt_prefix="p ")
    assert judge.name == "judge" and not judge.differentiable and judge.spec.prompt_prefix == "p "
    with pytest.raises(ValueError, match="fn="):
        build_reward("callable")
    with pytest.raises(ValueError, match="no path"):
        build_reward("callable", fn=mean_score, path="weights")
    with pytest.raises(ValueError, match=r"nn\.Module"):
        build_reward("callable", fn=mean_score, dtype=torch.bfloat16)


def test_callable_kind_casts_a_module_fn():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 1)

        def forward(self, x: Tensor, cond) -> Tensor:
            return self.lin(x.flatten(1).to(self.lin.weight.dtype)).squeeze(-1)

    reward = build_reward("callable", fn=Net(), dtype=torch.bfloat16, device="cpu")
    assert reward.fn.lin.weight.dtype == torch.bfloat16 and not reward.fn.lin.weight.requires_grad
    assert reward(torch.rand(2, 1, 4, 4), None).dtype == torch.float32


def test_register_a_new_kind(isolated_registry):
    class Constant(Reward):
        def __init__(self, value: float, **kw) -> None:
            super().__init__(**kw)
            self.value = value

        def score(self, images: Tensor, cond) -> Tensor:
            return images.new_full((images.shape[0],), self.value)

    def build_constant(*, path, device, dtype, value=1.0, **kw) -> Reward:
        return Constant(value, **kw)

    register_reward_kind("constant", build_constant)
    assert "constant" in available_reward_kinds() and "constant" not in REWARD_KINDS
    reward = build_reward("constant", value=3.0, weight=2.0, prompt_prefix="x ")
    assert reward.spec == RewardSpec("constant", weight=2.0, prompt_prefix="x ")
    torch.testing.assert_close(reward(torch.rand(2, 1, 2, 2), None), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="already registered"):
        register_reward_kind("constant", build_constant)
    register_reward_kind("constant", lambda **kw: "not a reward", overwrite=True)
    with pytest.raises(TypeError, match="not a Reward"):
        build_reward("constant")
    with pytest.raises(TypeError, match="callable"):
        register_reward_kind("other", None)  # type: ignore[arg-type]


def test_registered_kind_with_source_requires_path(isolated_registry):
    calls = []

    def build_weighted(*, path, device, dtype, **kw) -> Reward:
        calls.append((path, dtype))
        return CallableReward(mean_score, **kw)

    register_reward_kind("weighted", build_weighted, source="someone/weights-v1")
    with pytest.raises(MissingWeightsError, match=re.escape("someone/weights-v1")):
        build_reward("weighted")
    assert calls == []  # refused before the builder runs
    build_reward("weighted", path="local/dir", dtype="bf16")
    assert calls == [("local/dir", torch.bfloat16)]  # config-style dtype names become torch dtypes
    register_reward_kind("weighted", build_weighted, overwrite=True)  # no source: path optional
    build_reward("weighted")
    assert calls[-1] == (None, None)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("fp32", torch.float32),
    ],
)
def test_dtype_names(name, dtype):
    assert registry.as_dtype(name) is dtype
    assert registry.as_dtype(dtype) is dtype and registry.as_dtype(None) is None


def test_unknown_dtype_name():
    with pytest.raises(ValueError, match="dtype"):
        build_reward("callable", fn=mean_score, dtype="int8")


def test_build_model_kinds_from_local_folders(tmp_path, one_thread):
    pytest.importorskip("transformers")
    from tests.rewards.test_clip_rewards import PROMPTS, make_tiny_clip, write_tiny_tokenizer

    from dmdr_fast.rewards import AestheticMLP, AestheticReward, CLIPScoreReward, PickScoreReward

    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    clip = make_tiny_clip(tokenizer)
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "head.pth")
    images = torch.rand(3, 3, 32, 32)

    reward = build_reward(
        "clip", path=tmp_path / "clip", loss_form="hinge", margin=0.7, dtype=torch.bfloat16, device="cpu"
    )
    assert isinstance(reward, CLIPScoreReward) and reward.name == "clip" and reward.spec.margin == 0.7
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert all(not p.requires_grad for p in reward.parameters()) and not reward.model.training
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32 and bool(((scores >= -1) & (scores <= 1)).all())

    pick = build_reward("pickscore", path=tmp_path / "clip", name="pick", scale=100.0)
    assert isinstance(pick, PickScoreReward) and pick.name == "pick" and pick.scale == 100.0

    aesthetic = build_reward("aesthetic", path=tmp_path / "clip", mlp_path=tmp_path / "head.pth")
    assert isinstance(aesthetic, AestheticReward) and aesthetic(images, None).shape == (3,)


def test_importing_rewards_does_not_import_transformers():
    code = textwrap.dedent(
        """
        import sys
        import dmdr_fast, dmdr_fast.rewards
        from dmdr_fast.rewards import build_reward, CLIPScoreReward, AestheticReward
        assert "transformers" not in sys.modules, "transformers imported eagerly"
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_rewards_from_config_maps_every_field():
    from dmdr_fast.config import RewardConfig
    from dmdr_fast.rewards import rewards_from_config

    cfgs = (
        RewardConfig(kind="hps", path="does/not/exist/here", name="h", weight=0.0),  # inactive: skipped
        RewardConfig(kind="none", weight=0.0),
    )
    assert rewards_from_config(cfgs) is None
    with pytest.raises(ValueError, match="ClassifierReward"):
        rewards_from_config((RewardConfig(kind="classifier"),))
    with pytest.raises(MissingWeightsError, match=r"HPS_v2\.1_compressed\.pt"):
        rewards_from_config((RewardConfig(kind="hps", weight=0.5),))  # path=None: says what to download


def test_reward_from_config_builds_the_spec_and_leaves_the_policy(monkeypatch):
    from dmdr_fast.config import RewardConfig
    from dmdr_fast.rewards import registry

    monkeypatch.setitem(
        registry._BUILDERS, "constant", lambda *, path, device, dtype, **kw: CallableReward(mean_score, **kw)
    )
    cfg = RewardConfig(
        kind="classifier", name="c", weight=0.3, combine="balanced", ratio=0.25, max_weight=2.0,
        prompt_prefix="Realistic photo ", form="hinge", margin=0.5,
    )  # fmt: skip
    r = registry.reward_from_config(_as_kind(cfg, "constant"))
    assert r.spec == RewardSpec(
        "c", weight=0.3, loss_form="hinge", margin=0.5, prompt_prefix="Realistic photo "
    )
    # The combination policy stays in the config (the Trainer reads it); the reward has none.
    assert not any(hasattr(r, a) for a in ("combine", "ratio", "max_weight"))
    unnamed = registry.reward_from_config(_as_kind(RewardConfig(kind="classifier", weight=0.3), "constant"))
    assert unnamed.name == "constant"  # no name: the kind, as the Trainer matches it


def test_build_reward_takes_a_spec_or_its_fields(isolated_registry):
    spec = RewardSpec("judge", weight=0.25, loss_form="hinge", margin=0.5, prompt_prefix="a ")
    reward = build_reward("callable", fn=mean_score, spec=spec)
    assert reward.spec is spec
    assert build_reward("callable", fn=mean_score, name=None).name == "callable"  # None: the kind
    with pytest.raises(TypeError, match=r"not both.*'weight'"):
        build_reward("callable", fn=mean_score, spec=spec, weight=1.0)
    with pytest.raises(TypeError, match="combine"):  # combination policy is not a reward argument
        build_reward("callable", fn=mean_score, combine="balanced")
    seen = []

    def build_spy(*, path, spec, device, dtype, **kw) -> Reward:
        seen.append((spec, kw))
        return CallableReward(mean_score, spec=spec)

    register_reward_kind("spy", build_spy)
    build_reward("spy", weight=0.5, extra=1)
    assert seen == [(RewardSpec("spy", weight=0.5), {"extra": 1})]  # builders get the spec whole


def _as_kind(cfg, kind):
    """A RewardConfig-like object with another kind (RewardConfig's kind is a closed Literal)."""
    import dataclasses

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return type("Cfg", (), {**fields, "kind": kind, "active": True})()
