"""GRPO foundations (docs/method.md §12): the few-step policy's log-probabilities against a direct
Gaussian density, and group advantages on hand-made groups (ties, single members, NaN scores)."""

from __future__ import annotations

import math

import pytest
import torch

from dmdr_fast.algo.advantages import group_advantages
from dmdr_fast.algo.policy import gaussian_logprob, policy_logprobs, policy_rollout


def test_gaussian_logprob_is_the_normal_density():
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(mu, std.view(4, 1, 1)).log_prob(x).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_logprob(x, mu, std), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        gaussian_logprob(x, mu, 0.3), torch.distributions.Normal(mu, 0.3).log_prob(x).sum(dim=(1, 2))
    )
    with pytest.raises(ValueError, match="std"):
        gaussian_logprob(x, mu, 0.0)


class Linear(torch.nn.Module):
    """A tiny velocity model v = a·x + b·t (differentiable in a, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, t, cond):
        return self.a * x + self.b * t.view(-1, 1, 1) + 0.0 * cond.view(-1, 1, 1)


@pytest.mark.parametrize("grid", [[1.0, 0.0], [1.0, 0.6, 0.25, 0.0]], ids=["1-step", "3-step"])
def test_rollout_logprobs_match_each_transition_density(grid):
    model = Linear()
    grid_t = torch.tensor(grid)
    noise = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1))
    cond = torch.arange(5)
    out_std = 0.05
    ro = policy_rollout(
        model, noise, cond, grid_t, out_std=out_std, generator=torch.Generator().manual_seed(2)
    )
    N = len(grid) - 1
    assert ro.states.shape == (N, 5, 2, 3) and ro.logprobs.shape == (N, 5)
    assert torch.equal(ro.states[0], noise)
    actions = ro.actions()
    with torch.no_grad():
        for k in range(N):  # the density written out per step
            x, t = ro.states[k], grid_t[k]
            x0 = x - t * model(x, t.expand(5), cond)
            if k < N - 1:
                mean, std = (1 - grid_t[k + 1]) * x0, float(grid_t[k + 1])
            else:
                mean, std = x0, out_std
                torch.testing.assert_close(ro.mean_output, x0)
            ref = torch.distributions.Normal(mean, std).log_prob(actions[k]).sum(dim=(1, 2))
            torch.testing.assert_close(ro.logprobs[k], ref, rtol=1e-5, atol=1e-3)
    # Recomputed with gradients: equal at the same weights, and the ratio's gradient reaches them.
    lp = policy_logprobs(model, ro, cond, out_std=out_std)
    torch.testing.assert_close(lp.detach(), ro.logprobs, rtol=1e-5, atol=1e-3)
    (lp.sum()).backward()
    assert model.a.grad is not None and model.a.grad.abs() > 0


def test_rollout_refuses_bad_grid_and_noise_level():
    model, noise, cond = Linear(), torch.randn(2, 2, 3), torch.arange(2)
    with pytest.raises(ValueError, match="end"):
        policy_rollout(model, noise, cond, torch.tensor([1.0, 0.5]), out_std=0.1)
    with pytest.raises(ValueError, match="sde_noise"):
        policy_rollout(model, noise, cond, torch.tensor([1.0, 0.0]), out_std=0.0)


def test_advantages_standardise_within_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, valid = group_advantages(r, g)
    s0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    torch.testing.assert_close(adv[:3], torch.tensor([-1 / s0, 0.0, 1 / s0]), rtol=1e-5, atol=1e-5)
    s1 = math.sqrt(((10 - 20) ** 2 * 2 + 20**2) / 3)
    torch.testing.assert_close(adv[3:], torch.tensor([-10 / s1, -10 / s1, 20 / s1]), rtol=1e-5, atol=1e-5)
    assert valid.all()
    # Shifting or scaling a group's rewards does not change its advantages.
    adv2, _ = group_advantages(torch.cat([r[:3] * 7 + 3, r[3:]]), g)
    torch.testing.assert_close(adv2, adv, rtol=1e-4, atol=1e-4)


def test_ties_single_members_and_nan_scores():
    r = torch.tensor([5.0, 5.0, 5.0, 7.0, float("nan"), 1.0, 3.0, float("nan")])
    g = torch.tensor([0, 0, 0, 1, 2, 2, 2, 3])
    adv, valid = group_advantages(r, g)
    assert torch.equal(adv[:3], torch.zeros(3))  # all tied: no signal
    assert adv[3] == 0 and valid[3]  # a single member: no signal, still valid
    assert not valid[4] and adv[4] == 0  # NaN: dropped
    torch.testing.assert_close(adv[5:7], torch.tensor([-1.0, 1.0]), rtol=1e-5, atol=1e-5)  # the others
    assert not valid[7] and adv[7] == 0  # a group of one NaN
    assert torch.isfinite(adv).all()


def test_several_rewards_sum_versus_per_reward():
    # Reward 0 varies by 1000s, reward 1 by 1s, in opposite directions.
    r = torch.tensor([[0.0, 1.0], [1000.0, 0.0], [2000.0, -1.0]])
    g = torch.zeros(3, dtype=torch.int64)
    summed, _ = group_advantages(r, g, mode="sum")
    per, _ = group_advantages(r, g, mode="per_reward")
    assert summed[2] > summed[0]  # the large reward decides
    torch.testing.assert_close(per, torch.zeros(3), atol=1e-5, rtol=0)  # normalised, they cancel
    weighted, _ = group_advantages(r, g, mode="per_reward", weights=[1.0, 2.0])
    assert weighted[0] > weighted[2]  # now the second reward decides
    nan_row = r.clone()
    nan_row[1, 1] = float("nan")
    _, valid = group_advantages(nan_row, g, mode="per_reward")
    assert valid.tolist() == [True, False, True]


def test_clipping_and_argument_errors():
    r = torch.tensor([0.0] * 99 + [1.0])
    adv, _ = group_advantages(r, torch.zeros(100, dtype=torch.int64), clip=3.0)
    assert adv.max() == 3.0  # the lone outlier's 9.95 is clipped
    with pytest.raises(ValueError, match="groups"):
        group_advantages(r, torch.zeros(100))
    with pytest.raises(ValueError, match="mode"):
        group_advantages(r, torch.zeros(100, dtype=torch.int64), mode="max")
    with pytest.raises(ValueError, match="weights"):
        group_advantages(r, torch.zeros(100, dtype=torch.int64), weights=[1.0, 2.0])


def _decoupled_inputs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 2, 3, 3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x0 = r(*shape).requires_grad_(True)
    return x0, {
        "dm_x_t": r(*shape), "dm_t": torch.rand(B, generator=g) * 0.8 + 0.1, "v_fake": r(*shape),
        "dm_v_cond": r(*shape), "ca_x_t": r(*shape), "ca_t": torch.rand(B, generator=g) * 0.8 + 0.1,
        "ca_v_cond": r(*shape), "ca_v_uncond": r(*shape), "guidance": 3.0,
    }  # fmt: skip


def _grad(x0, kw, **extra):
    from dmdr_fast.algo.losses import decoupled_dmd_loss

    out = decoupled_dmd_loss(x0, **kw, backend="torch", **extra)
    (g,) = torch.autograd.grad(out.loss, x0)
    return g, out


def test_ca_sample_weights_scale_each_samples_cfg_term_only():
    x0, kw = _decoupled_inputs()
    g_plain, plain = _grad(x0, kw)
    g_ones, ones = _grad(x0, kw, ca_sample_weight=torch.ones(4))
    torch.testing.assert_close(g_ones, g_plain, rtol=1e-5, atol=1e-7)  # weight 1 = plain Decoupled DMD
    torch.testing.assert_close(ones.loss, plain.loss, rtol=1e-5, atol=1e-7)
    g_dm, _ = _grad(x0, kw, ca_weight=0.0)
    g_ca = g_plain - g_dm
    w = torch.tensor([0.0, 0.5, 1.0, 2.5])
    g_w, out = _grad(x0, kw, ca_sample_weight=w, ca_weight=0.7, dm_weight=1.3)
    expected = 1.3 * g_dm + 0.7 * w.view(-1, 1, 1, 1) * g_ca
    torch.testing.assert_close(g_w, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w[0], 1.3 * g_dm[0], rtol=1e-5, atol=1e-7)  # w = 0: no CA push
    d_ca = g_ca * x0.numel()  # the CA direction: loss = ½·mean(d²), gradient d / numel
    torch.testing.assert_close(ones.ca_loss, plain.ca_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        out.ca_loss, 0.5 * (w.view(-1, 1, 1, 1) * d_ca**2).mean(), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match="ca_sample_weight"):
        _grad(x0, kw, ca_sample_weight=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="ca_sample_weight"):
        _grad(x0, kw, ca_sample_weight=torch.ones(3))


def test_ca_weights_from_advantages():
    from dmdr_fast.algo.advantages import ca_weights

    adv = torch.tensor([-2.0, -0.5, 0.0, 1.5, 0.7])
    valid = torch.tensor([True, True, True, True, False])
    w = ca_weights(adv, valid, scale=1.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 1.0, 2.5, 1.0]))  # floor at 0; dropped → 1
    torch.testing.assert_close(ca_weights(adv, valid, scale=0.0), torch.ones(5))
    # A group's advantages average to 0, so its weights average to 1 while none hits the floor.
    r = torch.tensor([1.0, 2.0, 4.0, 3.0])
    a, v = group_advantages(r, torch.zeros(4, dtype=torch.int64))
    assert abs(float(ca_weights(a, v, scale=0.5).mean()) - 1.0) < 1e-5
