"""The condition-tree helpers every layer shares (dmdr_fast.conditions): containers, shared leaves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dmdr_fast.conditions import cat_conds, cond_batch_size, expand_cond, index_cond, map_tensors, slice_cond


@dataclasses.dataclass(frozen=True)
class _TextCond:
    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None


def test_generic_condition_helpers():
    def make(n: int, offset: float) -> _TextCond:
        return _TextCond(torch.full((n, 4, 2), offset), torch.full((n, 3), offset))

    cat = cat_conds([make(2, 0.0), make(1, 1.0)])
    assert cat.embeds.shape == (3, 4, 2) and cat.mask is None
    assert cond_batch_size(cat) == 3
    assert slice_cond(cat, 2, 3).pooled.tolist() == [[1.0, 1.0, 1.0]]
    nested = cat_conds([{"a": (torch.zeros(2), torch.ones(2, 1))}, {"a": (torch.ones(1), torch.ones(1, 1))}])
    assert nested["a"][0].tolist() == [0, 0, 1] and cond_batch_size(nested) == 3
    assert cond_batch_size(None) is None
    with pytest.raises(ValueError, match="at least one"):
        cat_conds([])
    with pytest.raises(ValueError, match="different keys"):
        cat_conds([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="some parts only"):
        cat_conds([None, torch.zeros(1)])
    # Non-tensor leaves are shared by every part: kept once when equal, refused when they differ.
    assert cat_conds(["a prompt", "a prompt"]) == "a prompt"
    with pytest.raises(ValueError, match="shared"):
        cat_conds(["a prompt", "another"])


def test_slice_index_expand_and_map_keep_the_structure():
    cond = {"emb": torch.arange(6.0).view(3, 2), "mask": (torch.ones(3, 1), None), "tag": "x"}
    part = slice_cond(cond, 1, 3)
    assert part["emb"].tolist() == [[2.0, 3.0], [4.0, 5.0]] and part["tag"] == "x"
    assert part["mask"][1] is None and cond_batch_size(part) == 2
    picked = index_cond(cond, torch.tensor([2, 0]))
    assert picked["emb"][:, 0].tolist() == [4.0, 0.0]
    one = slice_cond(cond, 0, 1)
    assert cond_batch_size(expand_cond(one, 5)) == 5
    with pytest.raises(ValueError, match="batch size 3"):
        expand_cond(cond, 5)
    doubled = map_tensors(lambda v: v * 2, cond)
    assert doubled["emb"][1].tolist() == [4.0, 6.0] and doubled["tag"] == "x"
