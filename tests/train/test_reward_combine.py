"""The generator step's reward path: gradients on a detached x0, joined by reward_grad_combine, one backward.

The key property (issue 4): with ``combine="fixed"`` the student's parameter gradients equal those
of the plain summed loss ``L_DMD + weight·ℓ_R``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dmdr_fast.algo import generator_dmd_loss, renoise
from dmdr_fast.algo.generator import DMDInputs, RewardPolicy, fake_and_real
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.rewards import ClassifierReward, CompositeReward, Reward, RewardSpec
from dmdr_fast.train import ClassLabelSampler, Trainer

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def _config(rewards, dmd_weight=1.0) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 4, "batch_size": 5, "tensorboard": False, "device": "cpu",
                      "sample_every": 0, "eval_every": 0, "checkpoint_every": 0},
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 1, "dmd_weight": dmd_weight},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 2},
            "rewards": rewards,
        }
    )  # fmt: skip


def _classifier(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def _trainer(cfg, rewards) -> Trainer:
    return Trainer(
        cfg,
        DiTAdapter(tiny_dit(num_layers=1, seed=0)),
        reward=CompositeReward(rewards),
        data=ClassLabelSampler(10),
    )


def _inputs(tr: Trainer, seed: int = 0):
    """x_in, t, labels and the DMD inputs of one generator step (no grad)."""
    g = torch.Generator().manual_seed(seed)
    B = tr.config.train.batch_size
    x_in = torch.randn((B, *tr.student.sample_shape), generator=g)
    t = torch.full((B,), 0.8)
    labels = torch.randint(10, (B,), generator=g)
    with torch.no_grad():
        x0 = x_in - t.view(-1, 1, 1, 1) * tr.student.velocity(x_in, t, labels)
    tau = torch.rand(B, generator=g) * 0.8 + 0.1
    x_tau = renoise(x0, tau, torch.randn(x0.shape, generator=g))
    v_fake, v_cond, v_uncond = fake_and_real(tr.scores, x_tau, tau, labels, None, 0.3)
    # A fresh LoRA critic equals the teacher (zero DMD direction): move the fake score off it.
    v_fake = v_fake + 0.3 * torch.randn(v_fake.shape, generator=g)
    return x_in, t, labels, DMDInputs(x_tau, tau, v_fake, v_cond, v_uncond, 1.0, 0.3)


def _student_x0(tr, x_in, t, labels):
    return x_in - t.view(-1, 1, 1, 1) * tr.student.velocity(x_in, t, labels)


def _grads(tr) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in tr.student.network.parameters() if p.requires_grad]


def _reward(seed: int, name: str, weight: float = 1.0, **kwargs) -> ClassifierReward:
    spec = RewardSpec(name, weight=weight)
    return ClassifierReward(_classifier(seed), spec=spec, num_classes=10, in_channels=1, **kwargs)


def test_fixed_mode_equals_the_summed_loss():
    rewards = [_reward(1, "a", 0.7)]
    tr = _trainer(_config([{"kind": "classifier", "name": "a", "weight": 0.7}]), rewards)
    x_in, t, labels, dmd_in = _inputs(tr)

    tr.student.network.zero_grad(set_to_none=True)
    metrics = tr.generator_backward(_student_x0(tr, x_in, t, labels), dmd_in, labels, 2)
    ours = _grads(tr)

    tr.student.network.zero_grad(set_to_none=True)
    x0 = _student_x0(tr, x_in, t, labels)
    loss = generator_dmd_loss(x0, *dmd_in[:6]) + tr.reward(tr.student.decode(x0), labels).loss.mean()
    loss.backward()
    plain = _grads(tr)

    assert len(ours) == len(plain) > 0
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # fp32: only summation order differs
    assert metrics["reward_w/a"] == pytest.approx(0.7)
    assert -1.0 <= metrics["reward_cos/a"] <= 1.0 and metrics["reward_push/a"] > 0
    assert metrics["loss_dmd"] > 0  # a non-trivial DMD direction
    assert metrics["reward_nonfinite/a"] == 0


def test_several_fixed_rewards_also_equal_the_summed_loss():
    rewards = [_reward(1, "a", 0.7), _reward(2, "b", 0.2, mode="prob")]
    cfg = _config(
        [
            {"kind": "classifier", "name": "a", "weight": 0.7},
            {"kind": "classifier", "name": "b", "weight": 0.2},
        ]
    )
    tr = _trainer(cfg, rewards)
    x_in, t, labels, dmd_in = _inputs(tr, seed=3)
    tr.student.network.zero_grad(set_to_none=True)
    metrics = tr.generator_backward(_student_x0(tr, x_in, t, labels), dmd_in, labels, 2)
    ours = _grads(tr)
    tr.student.network.zero_grad(set_to_none=True)
    x0 = _student_x0(tr, x_in, t, labels)
    (generator_dmd_loss(x0, *dmd_in[:6]) + tr.reward(tr.student.decode(x0), labels).loss.mean()).backward()
    for a, b in zip(ours, _grads(tr), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "reward_cos/fixed" in metrics  # one shared gradient for the linear (fixed) rewards


def _x0_gradient(tr, x0_leaf, dmd_in, labels):
    """The gradient the Trainer pushes into x0 (x0 a leaf, so it lands in .grad)."""
    x0 = x0_leaf.clone().requires_grad_(True)
    metrics = tr.generator_backward(x0, dmd_in, labels, 2)
    return x0.grad, metrics


@pytest.mark.parametrize("cap", [None, 0.05])
def test_balanced_mode_scales_each_sample_to_the_ratio(cap):
    r = _reward(1, "a")  # the policy comes from the config entry alone
    cfg = _config(
        [{"kind": "classifier", "name": "a", "combine": "balanced", "ratio": 0.5, "max_weight": cap}]
    )
    tr = _trainer(cfg, [r])
    x_in, t, labels, dmd_in = _inputs(tr)
    x0 = _student_x0(tr, x_in, t, labels).detach()
    got, metrics = _x0_gradient(tr, x0, dmd_in, labels)

    xd = x0.clone().requires_grad_(True)
    (g_dmd,) = torch.autograd.grad(generator_dmd_loss(xd, *dmd_in[:6]), xd)
    (g_r,) = torch.autograd.grad(tr.reward(tr.student.decode(xd), labels).terms["a"].mean(), xd)
    a, b = g_dmd.flatten(1).norm(dim=1), g_r.flatten(1).norm(dim=1)
    w = (0.5 * a / (b + 1e-12)).clamp(max=math.inf if cap is None else cap)
    torch.testing.assert_close(got, g_dmd + w.view(-1, 1, 1, 1) * g_r, rtol=1e-5, atol=1e-9)
    if cap is None:  # each sample's reward push is exactly half its DMD push
        assert metrics["reward_push/a"] == pytest.approx(0.5, rel=1e-4)
    else:
        assert metrics["reward_w/a"] <= cap + 1e-7


def _poison_first_pixel(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[..., 0, 0] = math.nan
    return g


class _NaNGradReward(Reward):
    """A reward whose gradient has NaN in the first pixel of every image (a broken reward model)."""

    def score(self, images, cond):
        images = images * 1.0
        images.register_hook(_poison_first_pixel)
        return images.flatten(1).mean(1)


def test_non_finite_reward_gradients_are_zeroed_and_counted():
    r = _NaNGradReward(spec=RewardSpec("bad", weight=1.0), check_inputs=False)
    tr = _trainer(_config([{"kind": "classifier", "name": "bad", "weight": 1.0}]), [r])
    x_in, t, labels, dmd_in = _inputs(tr)
    tr.student.network.zero_grad(set_to_none=True)
    x0 = _student_x0(tr, x_in, t, labels)
    metrics = tr.generator_backward(x0, dmd_in, labels, 2)
    xd = x0.detach().requires_grad_(True)
    (g_r,) = torch.autograd.grad(r(tr.student.decode(xd), labels).mean(), xd)
    expected = int((~torch.isfinite(g_r)).sum())  # NaN survives where decode does not clamp
    assert expected >= 1 and metrics["reward_nonfinite/bad"] == expected
    assert all(torch.isfinite(g).all() for g in _grads(tr))
    assert metrics["loss_dmd"] > 0


def test_reward_only_baseline_runs_with_zero_dmd_weight():
    r = _reward(1, "a", 0.5)
    tr = _trainer(_config([{"kind": "classifier", "name": "a", "weight": 0.5}], dmd_weight=0.0), [r])
    before = [p.detach().clone() for p in tr.student.network.parameters()]
    tr.fit(max_steps=2, progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.student.network.parameters(), strict=True))


def test_balanced_needs_dmd():
    from dmdr_fast.config import ConfigError

    with pytest.raises(ConfigError, match="balanced"):
        _config([{"kind": "classifier", "combine": "balanced"}], dmd_weight=0.0)


def test_a_reward_without_a_config_entry_is_fixed_at_its_own_weight():
    # The config lists another reward ("other"); "a" is not in it.
    tr = _trainer(_config([{"kind": "classifier", "name": "other", "weight": 0.7}]), [_reward(1, "a", 0.3)])
    assert tr.reward_policies == [RewardPolicy("a", "fixed", 0.3)]
    x_in, t, labels, dmd_in = _inputs(tr)
    tr.student.network.zero_grad(set_to_none=True)
    metrics = tr.generator_backward(_student_x0(tr, x_in, t, labels), dmd_in, labels, 2)
    ours = _grads(tr)
    tr.student.network.zero_grad(set_to_none=True)
    x0 = _student_x0(tr, x_in, t, labels)
    (generator_dmd_loss(x0, *dmd_in[:6]) + tr.reward(tr.student.decode(x0), labels).loss.mean()).backward()
    for a, b in zip(ours, _grads(tr), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # trains what the logged loss says
    assert metrics["reward_w/a"] == pytest.approx(0.3)


def test_a_config_weight_that_disagrees_with_the_reward_is_refused():
    cfg = _config([{"kind": "classifier", "name": "a", "weight": 0.7}])
    with pytest.raises(ValueError, match=r"reward 'a'.*weight 0\.7.*spec\.weight 0\.5"):
        _trainer(cfg, [_reward(1, "a", 0.5)])
    # Matched by kind when the entry has no name.
    with pytest.raises(ValueError, match=r"reward 'classifier'.*0\.05.*1\.0"):
        _trainer(_config([{"kind": "classifier"}]), [_reward(1, "classifier", 1.0)])
    # balanced does not use the weight to combine: no disagreement to refuse.
    cfg = _config([{"kind": "classifier", "name": "a", "weight": 0.7, "combine": "balanced", "ratio": 0.5}])
    tr = _trainer(cfg, [_reward(1, "a", 0.5)])
    assert tr.reward_policies == [RewardPolicy("a", "balanced", 0.7, 0.5, None)]
