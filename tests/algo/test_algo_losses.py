"""Tests of dmdr_fast.algo.losses: critic loss, generator DMD loss, Decoupled DMD."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.algo import critic_loss, decoupled_dmd_loss, generator_dmd_loss, renoise


def _dmd_inputs(seed: int = 0, shape=(3, 2, 4, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype) * 0.9 + 0.05
    x_t = renoise(x0, t, torch.randn(shape, generator=g, dtype=dtype))
    v = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(3)]
    return x0, x_t, t, *v


def _hand_direction(x0, x_t, t, v_fake, v_real, eps=1e-8):
    """The docs/method.md §5.4 formulas written out literally, sample by sample."""
    out = torch.empty_like(x0)
    for b in range(x0.shape[0]):
        x0_real = x_t[b] - t[b] * v_real[b]
        x0_fake = x_t[b] - t[b] * v_fake[b]
        norm = (x0[b] - x0_real).abs().mean() + eps
        out[b] = (x0_fake - x0_real) / norm
    return out


# --------------------------------------------------------------------------------------------------
# Critic.
# --------------------------------------------------------------------------------------------------


def test_critic_loss_by_hand():
    v_pred = torch.tensor([[1.0, 0.0], [2.0, 2.0]], requires_grad=True)
    x0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    eps = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # target ε − x0 = [[1, 0], [−1, 0]] ; residuals [[0, 0], [3, 2]] ; mean of squares = 13/4
    loss = critic_loss(v_pred, x0, eps)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(3.25)
    loss.backward()
    # d/dv mean(r²) = 2r / numel
    torch.testing.assert_close(v_pred.grad, torch.tensor([[0.0, 0.0], [1.5, 1.0]]))


def test_critic_loss_only_v_pred_gets_gradient():
    x0 = torch.randn(2, 3, requires_grad=True)
    eps = torch.randn(2, 3, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    critic_loss(v, x0, eps).backward()
    assert x0.grad is None and eps.grad is None and v.grad is not None


def test_critic_loss_gradcheck_float64():
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert critic_loss(v, x0, eps).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda v: critic_loss(v, x0, eps), (v,))


def test_critic_loss_bad_inputs():
    with pytest.raises(ValueError, match="x0"):
        critic_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise"):
        critic_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------------
# Generator DMD loss.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1.0, 3.5])
def test_generator_loss_value_direction_and_gradient(w):
    x0, x_t, t, v_fake, v_cond, v_uncond = _dmd_inputs()
    x0 = x0.clone().requires_grad_(True)
    loss, g = generator_dmd_loss(x0, x_t, t, v_fake, v_cond, v_uncond, w, return_direction=True)
    v_real = v_uncond + w * (v_cond - v_uncond) if w > 1 else v_cond
    expected_g = _hand_direction(x0.detach(), x_t, t, v_fake, v_real)
    torch.testing.assert_close(g, expected_g)
    torch.testing.assert_close(loss, 0.5 * expected_g.square().mean())
    loss.backward()
    torch.testing.assert_close(x0.grad, expected_g / x0.numel())


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_generator_loss_no_cfg_ignores_uncond(w):
    x0, x_t, t, v_fake, v_cond, v_uncond = _dmd_inputs(1)
    with_uncond = generator_dmd_loss(x0, x_t, t, v_fake, v_cond, v_uncond, w, return_direction=True)
    without = generator_dmd_loss(x0, x_t, t, v_fake, v_cond, None, w, return_direction=True)
    assert torch.equal(with_uncond[1], without[1])
    torch.testing.assert_close(with_uncond[1], _hand_direction(x0, x_t, t, v_fake, v_cond))


def test_generator_loss_float32_and_bfloat16_inputs():
    x0, x_t, t, v_fake, v_cond, _ = _dmd_inputs(2, dtype=torch.float32)
    x0 = x0.to(torch.bfloat16).requires_grad_(True)
    loss = generator_dmd_loss(x0, x_t, t, v_fake, v_cond)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x0.grad.dtype == torch.bfloat16


def test_generator_loss_nan_is_made_finite():
    x0, x_t, t, v_fake, v_cond, _ = _dmd_inputs(3)
    v_fake = v_fake.clone()
    v_fake[0, 0, 0, 0] = float("nan")
    loss, g = generator_dmd_loss(x0, x_t, t, v_fake, v_cond, return_direction=True)
    assert bool(torch.isfinite(g).all()) and bool(torch.isfinite(loss))


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"x_t": torch.zeros(3, 2, 4, 5)}, ValueError, "x_t must have the shape of x0"),
        ({"t": torch.zeros(4)}, ValueError, r"t must have shape \(3,\)"),
        ({"t": torch.zeros(3, 1)}, ValueError, r"t must have shape \(3,\)"),
        ({"v_fake": torch.zeros(3, 2, 4)}, ValueError, "v_fake"),
        ({"v_cond": torch.zeros(2, 2, 4, 4)}, ValueError, "v_cond"),
        ({"v_uncond": torch.zeros(1, 2, 4, 4), "guidance": 2.0}, ValueError, "v_uncond"),
        ({"v_uncond": None, "guidance": 2.0}, ValueError, "v_uncond is required"),
        ({"guidance": float("nan")}, ValueError, "guidance"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"x0": [1.0]}, TypeError, "x0"),
    ],
)
def test_generator_loss_bad_inputs(change, exc, match):
    x0, x_t, t, v_fake, v_cond, v_uncond = _dmd_inputs(4)
    kwargs = dict(x0=x0, x_t=x_t, t=t, v_fake=v_fake, v_cond=v_cond, v_uncond=v_uncond, guidance=1.0)
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        generator_dmd_loss(**kwargs)


# --------------------------------------------------------------------------------------------------
# Decoupled DMD.
# --------------------------------------------------------------------------------------------------


def test_decoupled_dmd_terms_and_gradient():
    x0, x_dm, t_dm, v_fake, v_cond_dm, _ = _dmd_inputs(5)
    _, x_ca, t_ca, v_cond_ca, v_uncond_ca, _ = _dmd_inputs(6)
    w, a_dm, a_ca = 4.0, 0.7, 1.3
    x0 = x0.clone().requires_grad_(True)
    out = decoupled_dmd_loss(
        x0,
        dm_x_t=x_dm,
        dm_t=t_dm,
        v_fake=v_fake,
        dm_v_cond=v_cond_dm,
        ca_x_t=x_ca,
        ca_t=t_ca,
        ca_v_cond=v_cond_ca,
        ca_v_uncond=v_uncond_ca,
        guidance=w,
        dm_weight=a_dm,
        ca_weight=a_ca,
        return_direction=True,
    )
    xd = x0.detach()
    g_dm = _hand_direction(xd, x_dm, t_dm, v_fake, v_cond_dm)
    # CA numerator x̂0_cond − x̂0_cfg must be τ·(w − 1)·(v_cond − v_uncond)
    v_cfg = v_uncond_ca + w * (v_cond_ca - v_uncond_ca)
    g_ca = _hand_direction(xd, x_ca, t_ca, v_cond_ca, v_cfg)
    n_ca = (xd - (x_ca - t_ca.view(-1, 1, 1, 1) * v_cfg)).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
    tb = t_ca.view(-1, 1, 1, 1)
    torch.testing.assert_close(g_ca * n_ca, tb * (w - 1) * (v_cond_ca - v_uncond_ca))
    torch.testing.assert_close(out.dm_loss, 0.5 * g_dm.square().mean())
    torch.testing.assert_close(out.ca_loss, 0.5 * g_ca.square().mean())
    torch.testing.assert_close(out.loss, a_dm * out.dm_loss + a_ca * out.ca_loss)
    torch.testing.assert_close(out.direction, a_dm * g_dm + a_ca * g_ca)
    out.loss.backward()
    torch.testing.assert_close(x0.grad, out.direction / x0.numel())


def test_decoupled_numerators_add_up_to_plain_dmd():
    # Same renoised sample for both terms: DM numerator + CA numerator = plain DMD numerator.
    x0, x_t, t, v_fake, v_cond, v_uncond = _dmd_inputs(7)
    w = 3.0
    out = decoupled_dmd_loss(
        x0,
        dm_x_t=x_t,
        dm_t=t,
        v_fake=v_fake,
        dm_v_cond=v_cond,
        ca_x_t=x_t,
        ca_t=t,
        ca_v_cond=v_cond,
        ca_v_uncond=v_uncond,
        guidance=w,
        return_direction=True,
    )
    tb = t.view(-1, 1, 1, 1)
    x0_cond, x0_fake = x_t - tb * v_cond, x_t - tb * v_fake
    x0_cfg = x_t - tb * (v_uncond + w * (v_cond - v_uncond))
    dims = (1, 2, 3)
    n_dm = (x0 - x0_cond).abs().mean(dim=dims, keepdim=True) + 1e-8
    n_ca = (x0 - x0_cfg).abs().mean(dim=dims, keepdim=True) + 1e-8
    _, g_dm = generator_dmd_loss(x0, x_t, t, v_fake, v_cond, return_direction=True)
    g_ca = out.direction - g_dm
    torch.testing.assert_close(g_dm * n_dm + g_ca * n_ca, x0_fake - x0_cfg)


def test_decoupled_without_cfg_is_dm_only():
    x0, x_t, t, v_fake, v_cond, _ = _dmd_inputs(8)
    out = decoupled_dmd_loss(
        x0,
        dm_x_t=x_t,
        dm_t=t,
        v_fake=v_fake,
        dm_v_cond=v_cond,
        ca_x_t=x_t,
        ca_t=t,
        ca_v_cond=v_cond,
        ca_v_uncond=None,
        guidance=1.0,
    )
    assert out.direction is None and float(out.ca_loss) == 0.0
    torch.testing.assert_close(out.loss, generator_dmd_loss(x0, x_t, t, v_fake, v_cond))


def test_decoupled_bad_inputs():
    x0, x_t, t, v_fake, v_cond, v_uncond = _dmd_inputs(9)
    kwargs = dict(dm_x_t=x_t, dm_t=t, v_fake=v_fake, dm_v_cond=v_cond, ca_x_t=x_t, ca_t=t, ca_v_cond=v_cond)
    with pytest.raises(ValueError, match="ca_v_uncond is required"):
        decoupled_dmd_loss(x0, **kwargs, ca_v_uncond=None, guidance=2.0)
    with pytest.raises(ValueError, match=r"ca_t must have shape"):
        decoupled_dmd_loss(x0, **{**kwargs, "ca_t": t[:2]}, ca_v_uncond=v_uncond, guidance=2.0)
    with pytest.raises(ValueError, match="dm_weight"):
        decoupled_dmd_loss(x0, **kwargs, ca_v_uncond=v_uncond, guidance=2.0, dm_weight=-1.0)
