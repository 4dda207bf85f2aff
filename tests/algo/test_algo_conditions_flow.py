"""Tests of the condition helpers and the flow-convention formulas."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from dmdr_fast.algo import (
    cat_conds,
    cond_batch_size,
    expand_cond,
    index_cond,
    noise_like,
    predict_x0,
    renoise,
    velocity_target,
    x0_from_velocity,
)

Pair = namedtuple("Pair", ["emb", "pooled"])


def _nested(batch: int, offset: float = 0.0):
    return {
        "emb": torch.arange(batch * 3, dtype=torch.float32).reshape(batch, 3) + offset,
        "extra": (torch.full((batch, 2), offset), "shared-tag", None),
        "scale": torch.tensor(1.5),  # 0-dim: shared
    }


# --------------------------------------------------------------------------------------------------
# Conditions.
# --------------------------------------------------------------------------------------------------


def test_cond_batch_size():
    assert cond_batch_size(None) is None
    assert cond_batch_size(torch.zeros(4, 7)) == 4
    assert cond_batch_size(_nested(5)) == 5
    assert cond_batch_size(("text", 3)) is None
    with pytest.raises(ValueError, match="different leading sizes"):
        cond_batch_size((torch.zeros(2), torch.zeros(3)))


def test_index_cond_nested_and_types():
    cond = _nested(4)
    idx = torch.tensor([3, 1])
    out = index_cond(cond, idx)
    assert torch.equal(out["emb"], cond["emb"][[3, 1]])
    assert torch.equal(out["extra"][0], cond["extra"][0][[3, 1]])
    assert out["extra"][1] == "shared-tag" and out["extra"][2] is None
    assert out["scale"] is cond["scale"]
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(index_cond(cond["emb"], mask), cond["emb"][mask])
    pair = Pair(torch.arange(4.0), torch.arange(8.0).reshape(4, 2))
    sel = index_cond(pair, idx)
    assert isinstance(sel, Pair) and torch.equal(sel.emb, torch.tensor([3.0, 1.0]))
    assert index_cond(None, idx) is None
    with pytest.raises(TypeError, match="index"):
        index_cond(cond, [0, 1])


def test_cat_conds_nested():
    a, b = _nested(2, 0.0), _nested(3, 100.0)
    out = cat_conds([a, b])
    assert torch.equal(out["emb"], torch.cat([a["emb"], b["emb"]]))
    assert out["extra"][0].shape == (5, 2) and out["extra"][1] == "shared-tag"
    assert cond_batch_size(out) == 5
    assert cat_conds([None, None]) is None
    labels = cat_conds([torch.tensor([1, 2]), torch.tensor([7])])
    assert torch.equal(labels, torch.tensor([1, 2, 7]))


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([], "at least one"),
        ([torch.zeros(2), None], "some parts only"),
        ([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], "different keys"),
        ([(torch.zeros(1),), (torch.zeros(1), torch.zeros(1))], "type or length"),
        ([(torch.zeros(1), "x"), (torch.zeros(1), "y")], "shared"),
    ],
)
def test_cat_conds_mismatch_raises(parts, match):
    with pytest.raises(ValueError, match=match):
        cat_conds(parts)


def test_expand_cond():
    null = {"emb": torch.randn(1, 3, 4), "mask": torch.ones(1, 3)}
    out = expand_cond(null, 5)
    assert out["emb"].shape == (5, 3, 4) and torch.equal(out["emb"][4], null["emb"][0])
    same = torch.zeros(5, 2)
    assert expand_cond(same, 5) is same
    assert expand_cond(None, 5) is None
    with pytest.raises(ValueError, match="batch size 2"):
        expand_cond(torch.zeros(2, 3), 5)


# --------------------------------------------------------------------------------------------------
# Flow convention.
# --------------------------------------------------------------------------------------------------


def test_renoise_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    eps = torch.tensor([[0.5, -0.5], [2.0, 4.0]])
    t = torch.tensor([0.25, 1.0])
    # row 0: 0.75·x0 + 0.25·eps ; row 1: pure noise
    expected = torch.tensor([[0.875, 1.375], [2.0, 4.0]])
    torch.testing.assert_close(renoise(x0, t, eps), expected)
    torch.testing.assert_close(renoise(x0, torch.zeros(2), eps), x0)


def test_renoise_keeps_data_dtype_and_grad():
    x0 = torch.randn(3, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    out = renoise(x0, torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 2, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    # d x_t / d x0 = 1 − t, computed with float32 t (0.9 in bf16 would be 0.8984)
    torch.testing.assert_close(x0.grad[0].float(), torch.full((2, 2), 0.1), atol=1e-3, rtol=0)


def test_x0_from_velocity_inverts_renoise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g)
    eps = torch.randn(4, 3, generator=g)
    t = torch.tensor([1.0, 0.7, 0.3, 0.01])
    x_t = renoise(x0, t, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, t, velocity_target(x0, eps)), x0)


def test_predict_x0_calls_network():
    x = torch.ones(2, 3)
    t = torch.tensor([0.5, 1.0])
    out = predict_x0(lambda x, t, c: x * c, x, t, 2.0)  # v = 2x
    torch.testing.assert_close(out, torch.tensor([[0.0] * 3, [-1.0] * 3]))
    with pytest.raises(ValueError, match="velocity_fn"):
        predict_x0(lambda x, t, c: x[:1], x, t, None)


@pytest.mark.parametrize(
    ("args", "exc", "name"),
    [
        ((torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3)), ValueError, "t must have shape"),
        ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4)), ValueError, "noise"),
        ((torch.zeros(2, 3), [0.1, 0.2], torch.zeros(2, 3)), TypeError, "t must be"),
        ((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3)), TypeError, "t must be"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), torch.zeros(2, 3)), TypeError, "x0"),
    ],
)
def test_renoise_bad_inputs(args, exc, name):
    with pytest.raises(exc, match=name):
        renoise(*args)


def test_noise_like_is_seeded_and_matches_x():
    x = torch.zeros(3, 4, dtype=torch.float64)
    a = noise_like(x, torch.Generator().manual_seed(0))
    b = noise_like(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.float64 and torch.equal(a, b)
    assert torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
