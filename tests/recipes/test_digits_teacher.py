"""Teacher training (rectified flow + CFG label dropout) and the config-hash cache of the digits preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dmdr_fast.recipes.digits.teacher as teacher_mod
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.recipes.digits.data import load_digits_tensors
from dmdr_fast.recipes.digits.teacher import (
    config_hash,
    get_or_train_digits_classifiers,
    get_or_train_digits_teacher,
    resolve_config,
    sample_flow_times,
    train_flow_teacher,
)

TINY_TEACHER = {
    "model": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8},
    "train": {"steps": 3, "batch_size": 8, "warmup_steps": 0, "ema_decay": 0.9},
}
TINY_CLASSIFIERS = {
    "reward": {"width": 4, "feature_dim": 8, "epochs": 1},
    "eval": {"width": 6, "feature_dim": 8, "epochs": 1},
}


def _state(adapter: DiTAdapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter.transformer.state_dict().items()}


def test_sample_flow_times():
    g = torch.Generator().manual_seed(0)
    for mode in ("logit_normal", "uniform"):
        t = sample_flow_times(4096, mode, generator=g)
        assert t.shape == (4096,) and bool(((t > 0) & (t < 1)).all())
    t = sample_flow_times(4096, "logit_normal", generator=g)
    assert abs(float(t.mean()) - 0.5) < 0.02 and float(((t > 0.2) & (t < 0.8)).float().mean()) > 0.75
    with pytest.raises(ValueError, match="time_sampling"):
        sample_flow_times(3, "beta")  # type: ignore[arg-type]


def test_few_steps_reduce_loss_and_are_deterministic():
    images, labels = load_digits_tensors()
    images, labels = images[:64], labels[:64]
    logged: list[tuple[int, dict[str, float]]] = []
    kwargs = dict(steps=60, batch_size=32, lr=2e-3, seed=0, warmup_steps=5, progress=False, log_every=10)
    adapter = DiTAdapter(tiny_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8, seed=0))
    stats = train_flow_teacher(adapter, images, labels, log_fn=lambda s, m: logged.append((s, m)), **kwargs)
    assert stats["loss_final"] < 0.8 * stats["loss_initial"], stats
    assert [s for s, _ in logged] == [10, 20, 30, 40, 50, 60] and set(logged[0][1]) == {
        "loss",
        "lr",
        "grad_norm",
    }
    assert not adapter.training
    again = DiTAdapter(tiny_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8, seed=0))
    train_flow_teacher(again, images, labels, **kwargs)
    for (k, a), b in zip(adapter.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_flow_teacher_errors():
    adapter = DiTAdapter(tiny_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8))
    images, labels = load_digits_tensors()
    with pytest.raises(ValueError, match="images must have shape"):
        train_flow_teacher(adapter, images[:, :, :4], labels, steps=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="labels must be integer"):
        train_flow_teacher(adapter, images, labels[:5], steps=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="ema_decay"):
        train_flow_teacher(adapter, images, labels, steps=1, batch_size=2, lr=1e-3, ema_decay=1.0)


def test_resolve_config_and_hash():
    resolved = resolve_config(TINY_TEACHER, teacher_mod.DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")
    assert resolved["model"]["num_layers"] == 1 and resolved["model"]["sample_size"] == 8
    assert resolved["train"]["lr"] == teacher_mod.DEFAULT_DIGITS_TEACHER_CONFIG["train"]["lr"]
    assert config_hash(resolved, "x") == config_hash(dict(reversed(list(resolved.items()))), "x")
    assert config_hash(resolved, "x") != config_hash(resolved, "y")
    with pytest.raises(ValueError, match=r"teacher\.train\.stpes"):
        resolve_config({"train": {"stpes": 3}}, teacher_mod.DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")


def test_teacher_cache_hit_reuses_weights_without_training(tmp_path, monkeypatch):
    first, info = get_or_train_digits_teacher(tmp_path, TINY_TEACHER, progress=False)
    path = Path(info["cache_path"])
    assert not info["cache_hit"] and path.exists()
    assert path.name == f"digits_teacher-{info['config_hash']}.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files

    def fail(*args, **kwargs):
        raise AssertionError("the teacher must not be retrained on a cache hit")

    monkeypatch.setattr(teacher_mod, "train_flow_teacher", fail)
    second, info2 = get_or_train_digits_teacher(tmp_path, TINY_TEACHER, progress=False)
    assert info2["cache_hit"] and info2["stats"]["steps"] == 3 and not second.training
    for (k, a), b in zip(_state(first).items(), _state(second).values()):
        assert torch.equal(a, b), k
    other = {**TINY_TEACHER, "init_seed": 1}  # another config: another file, trained again
    with pytest.raises(AssertionError, match="must not be retrained"):
        get_or_train_digits_teacher(tmp_path, other, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_config"])
def test_corrupt_teacher_cache_is_replaced(tmp_path, damage):
    _, info = get_or_train_digits_teacher(tmp_path, TINY_TEACHER, progress=False)
    path = Path(info["cache_path"])
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"format": "dmdr_fast.digits_teacher/1", "config": {"x": 1}, "state_dict": {}}, path)
    with pytest.warns(UserWarning, match="ignoring"):
        _, info2 = get_or_train_digits_teacher(tmp_path, TINY_TEACHER, progress=False)
    assert not info2["cache_hit"]
    _, info3 = get_or_train_digits_teacher(tmp_path, TINY_TEACHER, progress=False)
    assert info3["cache_hit"]


def test_classifier_cache(tmp_path, monkeypatch):
    reward, evaluation, info = get_or_train_digits_classifiers(tmp_path, TINY_CLASSIFIERS, progress=False)
    assert not info["cache_hit"]
    assert reward.config.width == 4 and evaluation.config.width == 6
    splits = info["splits"]
    assert not set(splits.reward.tolist()) & set(splits.eval.tolist())
    assert set(info["metrics"]) == {"reward", "eval"}

    monkeypatch.setattr(teacher_mod, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    reward2, evaluation2, info2 = get_or_train_digits_classifiers(tmp_path, TINY_CLASSIFIERS, progress=False)
    assert info2["cache_hit"] and info2["metrics"] == info["metrics"]
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(reward2(x), reward(x), rtol=0, atol=0)
    torch.testing.assert_close(evaluation2.features(x), evaluation.features(x), rtol=0, atol=0)
    Path(info2["cache_path"]).write_bytes(b"")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="ignoring"):
        _, _, info3 = get_or_train_digits_classifiers(tmp_path, TINY_CLASSIFIERS, progress=False)
    assert not info3["cache_hit"]
