"""Decoupled DMD in the Trainer (``dmdr.decoupled``): inputs, wiring of the two terms, training, resume.

The loss itself is tested in ``tests/algo/test_algo_losses.py``; here: which velocities the Trainer
feeds it (the batched guidance forward against separate passes), where the CA sample comes from
(``dmdr.ca_renoise``), the direction the student receives against the formula written out, and
that runs train and resume exactly.
"""

from __future__ import annotations

import pytest
import torch
from tests.utils import assert_resume_is_exact

import dmdr_fast.algo.generator as generator_mod
from dmdr_fast.algo import noise_like, renoise
from dmdr_fast.algo.generator import DMDInputs, decoupled_inputs, dmd_direction
from dmdr_fast.config import ConfigError, DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.models.lora import lora_scale
from dmdr_fast.train import ClassLabelSampler, Trainer

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def _config(critic: str = "lora", ca_renoise: str = "independent", **dmdr) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 4, "batch_size": 3, "log_every": 1, "sample_every": 0, "eval_every": 0,
                      "checkpoint_every": 2, "tensorboard": False, "device": "cpu", "deterministic": True},
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 2, "guidance": 3.0, "decoupled": True,
                     "ca_renoise": ca_renoise, **dmdr},
            "critic": {"kind": critic, "lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 2},
        }
    )  # fmt: skip


def _trainer(cfg, out_dir=None) -> Trainer:
    return Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10), out_dir=out_dir
    )


def _perturb_critic(tr: Trainer) -> None:
    """A fresh LoRA critic equals the teacher (fake = real): give it weights so the terms differ."""
    g = torch.Generator().manual_seed(7)
    net = (tr.critic or tr.guidance).network
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _inputs(tr: Trainer, x0, x_tau, tau, t_in, labels, null, lam_r):
    """Decoupled DMD's inputs as the Trainer's generator step asks them (the run's RNG, step 0)."""
    return decoupled_inputs(
        tr.scores, x0, x_tau, tau, t_in, labels, null, lam_r,
        mode=tr.config.dmdr.ca_renoise, renoise_times=tr.dynars, step=0, generator=tr.gen,
    )  # fmt: skip


def _direction(tr: Trainer, x0, x_tau, tau, v_fake, v_cond, guidance, ca=None):
    """The generator's DMD gradient on x0 (what ``x0.backward`` receives) and the metrics."""
    d = tr.config.dmdr
    inputs = DMDInputs(x_tau, tau, v_fake, v_cond, None, guidance, 0.0, ca)
    leaf = x0.clone().requires_grad_(True)
    return dmd_direction(leaf, inputs, dmd_weight=d.dmd_weight, ca_weight=d.ca_weight, eps=d.eps)


def _case(tr: Trainer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = tr.config.train.batch_size
    x0 = torch.randn((B, *tr.student.sample_shape), generator=g)
    tau = torch.rand(B, generator=g) * 0.8 + 0.1
    x_tau = renoise(x0, tau, torch.randn(x0.shape, generator=g))
    labels = torch.randint(10, (B,), generator=g)
    t_in = torch.tensor([1.0, 0.6, 0.3])[:B]  # incl. a first-step sample (t_k = 1)
    return x0, x_tau, tau, labels, tr.student.null_condition(B), t_in


@pytest.mark.parametrize("critic", ["lora", "full"])
@pytest.mark.parametrize("ca_renoise", ["independent", "shared", "above_input"])
def test_inputs_equal_separate_passes(critic, ca_renoise):
    """The one batched guidance forward gives what separate passes at the right LoRA scale give."""
    tr = _trainer(_config(critic, ca_renoise))
    _perturb_critic(tr)
    x0, x_tau, tau, labels, null, t_in = _case(tr)
    lam_r = 0.4
    replay = torch.Generator().set_state(tr.gen.get_state())
    v_fake, v_cond, ca = _inputs(tr, x0, x_tau, tau, t_in, labels, null, lam_r)

    if ca_renoise == "shared":
        assert ca.x_t is x_tau and torch.equal(ca.t, tau)
    else:  # x0 (not x_tau) renoised again, at its own time and with fresh noise from the run's RNG
        t = tr.dynars.sample(len(t_in), 0, generator=replay)
        if ca_renoise == "above_input":
            u = torch.rand(len(t_in), generator=replay)
            t = torch.where(t_in < 1, t_in + (1 - t_in) * u, t)  # t_k = 1: nothing above, DMD law
            assert bool((ca.t[1:] > t_in[1:]).all() and (ca.t <= 1).all())
        assert torch.equal(ca.t, t) and not torch.equal(ca.t, tau)
        torch.testing.assert_close(ca.x_t, renoise(x0, t, noise_like(x0, replay)), rtol=0, atol=0)

    net = tr.guidance.network
    with torch.no_grad():
        if critic == "lora":
            with lora_scale(net, tr.config.critic.fake_scale):
                want_fake = tr.guidance.velocity(x_tau, tau, labels)

            def real(x, t, c):
                with lora_scale(net, lam_r):
                    return tr.guidance.velocity(x, t, c)
        else:
            want_fake = tr.critic.velocity(x_tau, tau, labels)
            mix = lam_r / tr.config.critic.fake_scale

            def real(x, t, c):  # DynaDG for a full critic: toward the critic's conditional velocity
                v = tr.guidance.velocity(x, t, c)
                return v + mix * (tr.critic.velocity(x, t, labels) - v)

        want = (real(x_tau, tau, labels), real(ca.x_t, ca.t, labels), real(ca.x_t, ca.t, null))
    tol = {"rtol": 1e-5, "atol": 1e-5}  # fp32: one batched forward vs separate ones
    torch.testing.assert_close(v_fake, want_fake, **tol)
    for got, exp in zip((v_cond, ca.v_cond, ca.v_uncond), want, strict=True):
        torch.testing.assert_close(got, exp, **tol)


def test_direction_is_the_two_normalised_terms():
    """What reaches x0 is dm_weight·τ(v_cond − v_fake)/n_dm + ca_weight·τ(w − 1)(v_cond − v_uncond)/n_ca
    (DMD2 normalisers), written out here independently of the op."""
    tr = _trainer(_config(dmd_weight=0.7, ca_weight=1.3))
    _perturb_critic(tr)
    x0, x_tau, tau, labels, null, t_in = _case(tr, seed=1)
    v_fake, v_cond, ca = _inputs(tr, x0, x_tau, tau, t_in, labels, null, 0.0)
    w = 3.0
    grad, metrics = _direction(tr, x0, x_tau, tau, v_fake, v_cond, w, ca)

    def norm(x):
        return x.abs().mean(dim=(1, 2, 3), keepdim=True)

    t_dm, t_ca = tau.view(-1, 1, 1, 1), ca.t.view(-1, 1, 1, 1)
    g_dm = t_dm * (v_cond - v_fake) / (norm(x0 - (x_tau - t_dm * v_cond)) + 1e-8)
    v_cfg = ca.v_uncond + w * (ca.v_cond - ca.v_uncond)
    g_ca = t_ca * (w - 1) * (ca.v_cond - ca.v_uncond) / (norm(x0 - (ca.x_t - t_ca * v_cfg)) + 1e-8)
    want = (0.7 * g_dm + 1.3 * g_ca) / x0.numel()  # loss = ½·mean(g²) per term
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-9)
    assert metrics["loss_dm"] > 0 and metrics["loss_ca"] > 0
    assert metrics["loss_dmd"] == pytest.approx(0.7 * metrics["loss_dm"] + 1.3 * metrics["loss_ca"], rel=1e-5)


def test_ca_weight_zero_leaves_the_dm_term_alone():
    tr = _trainer(_config(ca_weight=0.0))
    _perturb_critic(tr)
    x0, x_tau, tau, labels, null, t_in = _case(tr, seed=2)
    v_fake, v_cond, ca = _inputs(tr, x0, x_tau, tau, t_in, labels, null, 0.0)
    a, _ = _direction(tr, x0, x_tau, tau, v_fake, v_cond, 3.0, ca)
    b, _ = _direction(tr, x0, x_tau, tau, v_fake, v_cond, 1.0)  # plain DMD without CFG
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_jitter_at_or_below_one_has_no_ca_term():
    tr = _trainer(_config())
    _perturb_critic(tr)
    x0, x_tau, tau, labels, null, t_in = _case(tr, seed=3)
    v_fake, v_cond, ca = _inputs(tr, x0, x_tau, tau, t_in, labels, null, 0.0)
    _, m = _direction(tr, x0, x_tau, tau, v_fake, v_cond, 0.9, ca)
    assert m["loss_ca"] == 0.0 and m["loss_dm"] > 0


def test_step_feeds_the_loss_what_the_inputs_gave(monkeypatch):
    """One real ``step()``: the DM sample, the CA inputs, w and t_k reach the loss unmixed."""
    tr = _trainer(_config(ratio_update=1, guidance_jitter=0.5))
    seen: dict = {}
    inputs = generator_mod.decoupled_inputs

    def spy_inputs(nets, x0, x_tau, tau, t_in, cond, null, lam_r, **kw):
        seen["inputs"] = (x0, x_tau, tau, t_in, lam_r)
        seen["out"] = inputs(nets, x0, x_tau, tau, t_in, cond, null, lam_r, **kw)
        return seen["out"]

    loss = generator_mod.decoupled_dmd_loss

    def spy_loss(x0, **kw):
        seen["loss"] = (x0, kw)
        return loss(x0, **kw)

    monkeypatch.setattr(generator_mod, "decoupled_inputs", spy_inputs)
    monkeypatch.setattr(generator_mod, "decoupled_dmd_loss", spy_loss)
    metrics = tr.step()
    x0, x_tau, tau, t_in, lam_r = seen["inputs"]
    v_fake, v_cond, ca = seen["out"]
    lx0, kw = seen["loss"]
    assert torch.equal(lx0, x0) and kw["dm_x_t"] is x_tau and kw["dm_t"] is tau
    assert kw["v_fake"] is v_fake and kw["dm_v_cond"] is v_cond
    assert all(a is b for a, b in zip((kw["ca_x_t"], kw["ca_t"], kw["ca_v_cond"], kw["ca_v_uncond"]), ca))
    assert kw["guidance"] == metrics["guidance"] != 3.0  # the jittered w of this batch
    assert lam_r == metrics["lambda_r"]
    assert bool(torch.isin(t_in, tr.grid).all())  # the student's input time t_k
    assert (kw["dm_weight"], kw["ca_weight"]) == (1.0, 1.0)


@pytest.mark.parametrize(
    "critic,ca_renoise", [("lora", "independent"), ("full", "shared"), ("lora", "above_input")]
)
def test_trains_and_logs_both_terms(tmp_path, critic, ca_renoise):
    from dmdr_fast.train.logging import read_jsonl

    tr = _trainer(_config(critic, ca_renoise), tmp_path)
    before = [p.detach().clone() for p in tr.student.network.parameters()]
    tr.fit(progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_ca"] > 0 and r["loss_dm"] >= 0 for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.network.parameters()))


@pytest.mark.parametrize("ca_renoise", ["independent", "shared", "above_input"])
def test_resume_is_exact(tmp_path, ca_renoise):
    assert_resume_is_exact(_trainer, _config(ca_renoise=ca_renoise), tmp_path)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"guidance": 1.0}, "zero with dmdr.guidance"),
        ({"ca_renoise": "above_input", "num_steps": 1}, "empty for a 1-step student"),
    ],
)
def test_config_refuses_meaningless_settings(overrides, match):
    d = _config().to_dict()
    steps = overrides.pop("num_steps", None)
    d["dmdr"] = {**d["dmdr"], **overrides}
    if steps is not None:
        d["student"] = {**d["student"], "num_steps": steps}
    with pytest.raises(ConfigError, match=match):
        DMDRTrainerConfig.from_dict(d)
