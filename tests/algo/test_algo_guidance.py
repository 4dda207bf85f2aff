"""Tests of dmdr_fast.algo.guidance: CFG scale and jitter, the batched guidance query and its chunks."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.algo import GuidanceQuery, GuidanceScale, concat_guidance_queries, expand_cond, real_velocity


def _fake_cond_uncond(x_t, t, cond, null=None, *, fake_scale=2.0, real_scale=0.0):
    """The generator step's guidance batch (fake, cond[, uncond]) built with the one batching route."""
    queries = [GuidanceQuery(x_t, t, cond, fake_scale), GuidanceQuery(x_t, t, cond, real_scale)]
    if null is not None:
        queries.append(GuidanceQuery(x_t, t, expand_cond(null, x_t.shape[0]), real_scale))
    return concat_guidance_queries(queries)


def test_real_velocity_by_hand():
    v_cond = torch.tensor([[1.0, 2.0]])
    v_uncond = torch.tensor([[0.5, -1.0]])
    # w = 3: 0.5 + 3·0.5 = 2.0 ; −1 + 3·3 = 8
    torch.testing.assert_close(real_velocity(v_cond, v_uncond, 3.0), torch.tensor([[2.0, 8.0]]))


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0, -2.0])
def test_no_cfg_means_v_cond_exactly(w):
    v_cond, v_uncond = torch.randn(2, 3), torch.randn(2, 3)
    assert real_velocity(v_cond, v_uncond, w) is v_cond
    assert real_velocity(v_cond, None, 7.0) is v_cond


def test_real_velocity_bad_inputs():
    with pytest.raises(ValueError, match="v_uncond"):
        real_velocity(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)
    with pytest.raises(ValueError, match="guidance"):
        real_velocity(torch.zeros(2, 3), None, float("inf"))


def test_guidance_scale_disabled_draws_nothing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for scale in (1.0, 0.0, 0.7):
        cfg = GuidanceScale(scale, jitter=0.5)
        assert not cfg.enabled
        assert cfg.sample(g) == 1.0
    assert torch.equal(g.get_state(), state)


def test_guidance_scale_without_jitter_is_constant():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert GuidanceScale(4.0).sample(g) == 4.0
    assert torch.equal(g.get_state(), state)


def test_guidance_scale_jitter_range_mean_and_determinism():
    cfg = GuidanceScale(4.0, jitter=0.5)
    assert cfg.enabled
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([cfg.sample(g) for _ in range(4000)], dtype=torch.float64)
    assert float(draws.min()) >= 3.5 and float(draws.max()) <= 4.5
    # U(3.5, 4.5): mean 4, sd 1/sqrt(12); 6 standard errors
    assert abs(float(draws.mean()) - 4.0) < 6 * (1 / 12**0.5) / 4000**0.5
    assert float(draws.std()) == pytest.approx(1 / 12**0.5, rel=0.05)
    a = GuidanceScale(4.0, 0.5).sample(torch.Generator().manual_seed(3))
    b = GuidanceScale(4.0, 0.5).sample(torch.Generator().manual_seed(3))
    assert a == b


def test_guidance_scale_validation():
    with pytest.raises(ValueError, match="jitter"):
        GuidanceScale(4.0, jitter=-0.1)
    with pytest.raises(TypeError, match="scale"):
        GuidanceScale("4")


def test_guidance_batch_order_fake_cond_uncond():
    b = 3
    x_t = torch.randn(b, 2, 4, 4)
    t = torch.rand(b)
    cond = {"emb": torch.randn(b, 5, 8), "pooled": torch.randn(b, 8)}
    null = {"emb": torch.zeros(1, 5, 8), "pooled": torch.zeros(1, 8)}  # batch 1: broadcast
    batch = _fake_cond_uncond(x_t, t, cond, null, fake_scale=2.0, real_scale=0.375)
    assert batch.num_parts == 3
    assert batch.x.shape == (3 * b, 2, 4, 4) and batch.t.shape == (3 * b,)
    assert batch.cond["emb"].shape == (3 * b, 5, 8)
    assert torch.equal(batch.cond["emb"][:b], cond["emb"])
    assert torch.equal(batch.cond["emb"][b : 2 * b], cond["emb"])
    assert torch.equal(batch.cond["emb"][2 * b :], torch.zeros(b, 5, 8))
    expected_scale = torch.tensor([2.0] * b + [0.375] * b + [0.375] * b)
    assert torch.equal(batch.lora_scale, expected_scale) and batch.lora_scale.dtype == torch.float32
    for part in batch.x.chunk(3):
        assert torch.equal(part, x_t)

    out = torch.arange(3 * b, dtype=torch.float32).reshape(3 * b, 1, 1, 1).expand(3 * b, 2, 4, 4)
    fake, v_cond, v_uncond = batch.chunk(out)
    assert (
        float(fake[0, 0, 0, 0]) == 0
        and float(v_cond[0, 0, 0, 0]) == b
        and float(v_uncond[0, 0, 0, 0]) == 2 * b
    )


def test_guidance_batch_without_uncond():
    x_t, t, labels = torch.randn(4, 3), torch.rand(4), torch.tensor([1, 2, 3, 4])
    batch = _fake_cond_uncond(x_t, t, labels, None, fake_scale=2.0, real_scale=0.0)
    assert batch.num_parts == 2 and batch.x.shape == (8, 3)
    assert torch.equal(batch.cond, torch.cat([labels, labels]))
    fake, v_cond = batch.chunk(torch.randn(8, 3))
    assert fake.shape == v_cond.shape == (4, 3)


def test_concat_guidance_queries_decoupled_layout():
    b = 2
    x_dm, x_ca = torch.randn(b, 3), torch.randn(b, 3)
    t_dm, t_ca = torch.rand(b), torch.rand(b)
    c, null = torch.tensor([5, 6]), torch.tensor([10, 10])
    batch = concat_guidance_queries(
        [
            GuidanceQuery(x_dm, t_dm, c, 2.0),
            GuidanceQuery(x_dm, t_dm, c, 0.5),
            GuidanceQuery(x_ca, t_ca, c, 0.5),
            GuidanceQuery(x_ca, t_ca, null, 0.5),
        ]
    )
    assert batch.num_parts == 4
    assert torch.equal(batch.t, torch.cat([t_dm, t_dm, t_ca, t_ca]))
    assert torch.equal(batch.cond, torch.tensor([5, 6, 5, 6, 5, 6, 10, 10]))
    parts = batch.chunk(torch.arange(8.0))
    assert len(parts) == 4 and torch.equal(parts[3], torch.tensor([6.0, 7.0]))


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), None).chunk(torch.zeros(7, 2)),
            ValueError,
            "leading size 6",
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), None).chunk(torch.zeros(6, 2)),
            None,
            None,
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(2), None),
            ValueError,
            r"queries\[0\].t must have shape",
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), torch.zeros(4, 1)),
            ValueError,
            r"queries\[0\].cond has batch size 4",
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), None, torch.zeros(2, 1)),
            ValueError,
            "batch size 2",
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), None, fake_scale=float("nan")),
            ValueError,
            "lora_scale",
        ),
        (
            lambda: _fake_cond_uncond(torch.zeros(3, 2), torch.zeros(3), None, torch.zeros(3, 1)),
            ValueError,
            "some parts only",
        ),
        (lambda: concat_guidance_queries([]), ValueError, "at least one"),
    ],
)
def test_guidance_batch_bad_inputs(make, exc, match):
    if exc is None:
        make()
        return
    with pytest.raises(exc, match=match):
        make()


def test_chunk_rejects_wrong_size():
    batch = _fake_cond_uncond(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 4), torch.zeros(1, 4))
    assert batch.cond.shape == (6, 4)
    with pytest.raises(ValueError, match="leading size 6"):
        batch.chunk(torch.zeros(4, 3))
