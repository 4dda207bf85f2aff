"""LoRA: injection, per-sample scales (the 3B-batched guidance forward), gradients, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dmdr_fast.algo import GuidanceQuery, concat_guidance_queries
from dmdr_fast.models import (
    DIT_ATTENTION_TARGETS,
    DIT_LORA_TARGETS,
    LoraConfig,
    LoraConv2d,
    LoraLinear,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_scale,
    make_guidance,
    make_student,
    merge_and_unload,
    merged_state_dict,
    set_lora_scale,
    tiny_dit,
)

LAM_F, LAM_R = 2.0, 0.6
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def test_inject_returns_names_and_starts_at_base(teacher, batch):
    x, t, y = batch
    before = teacher.velocity(x, t, y)
    names = inject_lora(teacher.network, LoraConfig(targets=DIT_LORA_TARGETS, rank=4))
    assert len(names) == 2 * 6
    assert names[:4] == [f"transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
    assert all(isinstance(teacher.network.get_submodule(n), LoraLinear) for n in names)
    # B = 0 at init: exactly the base model; the wrapper still exposes the base weight.
    torch.testing.assert_close(teacher.velocity(x, t, y), before, rtol=0, atol=0)
    layer = teacher.network.get_submodule(names[0])
    assert layer.weight is layer.base_layer.weight and layer.lora_rank == {"default": 4}


def test_three_passes_in_one_batched_forward_match_separate_forwards(teacher, batch, randomize_lora):
    x, t, y = batch
    b = x.shape[0]
    guidance = make_guidance(teacher, LoraConfig(targets=DIT_LORA_TARGETS, rank=4, alpha=8))
    randomize_lora(guidance.network)
    null = guidance.null_condition(b)

    x3, t3, c3 = torch.cat([x, x, x]), torch.cat([t, t, t]), torch.cat([y, y, null])
    scales = torch.tensor([LAM_F] * b + [LAM_R] * b + [LAM_R] * b)
    with lora_scale(guidance.network, scales):
        v_fake, v_cond, v_uncond = guidance.velocity(x3, t3, c3).split(b)

    with lora_scale(guidance.network, LAM_F):
        ref_fake = guidance.velocity(x, t, y)
    with lora_scale(guidance.network, LAM_R):
        ref_cond = guidance.velocity(x, t, y)
        ref_uncond = guidance.velocity(x, t, null)
    with lora_scale(guidance.network, 0.0):
        ref_teacher = guidance.velocity(x, t, y)
    torch.testing.assert_close(v_fake, ref_fake, **TIGHT)
    torch.testing.assert_close(v_cond, ref_cond, **TIGHT)
    torch.testing.assert_close(v_uncond, ref_uncond, **TIGHT)
    # Non-vacuous: the roles really differ from each other and from the teacher.
    assert (ref_fake - ref_cond).abs().max() > 1e-2 and (ref_cond - ref_teacher).abs().max() > 1e-2

    # The one batching route of the library (algo.concat_guidance_queries) does the same.
    gb = concat_guidance_queries(
        [GuidanceQuery(x, t, y, LAM_F), GuidanceQuery(x, t, y, LAM_R), GuidanceQuery(x, t, null, LAM_R)]
    )
    with lora_scale(guidance.network, gb.lora_scale):
        helper = gb.chunk(guidance.velocity(gb.x, gb.t, gb.cond))
    for got, want in zip(helper, (ref_fake, ref_cond, ref_uncond)):
        torch.testing.assert_close(got, want, **TIGHT)


def test_scale_zero_is_the_base_model(teacher, batch, randomize_lora):
    x, t, y = batch
    base = teacher.velocity(x, t, y)
    inject_lora(teacher.network, LoraConfig(targets=DIT_LORA_TARGETS, rank=4))
    randomize_lora(teacher.network)
    with lora_scale(teacher.network, 0.0):
        torch.testing.assert_close(teacher.velocity(x, t, y), base, rtol=0, atol=0)
    with lora_scale(teacher.network, torch.zeros(3)):  # per-sample zeros: computed, then zeroed
        torch.testing.assert_close(teacher.velocity(x, t, y), base, **TIGHT)
    assert (teacher.velocity(x, t, y) - base).abs().max() > 1e-2  # default scale 1.0 is back


def test_gradients_reach_only_lora_parameters(teacher, batch, randomize_lora):
    x, t, y = batch
    guidance = make_guidance(teacher, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=4))
    randomize_lora(guidance.network)
    lora_ids = {id(p) for p in lora_parameters(guidance.network)}
    assert {id(p) for p in guidance.network.parameters() if p.requires_grad} == lora_ids
    with lora_scale(guidance.network, torch.tensor([2.0, 0.0, 1.0])):
        guidance.velocity(x, t, y).square().mean().backward()
    for p in guidance.network.parameters():
        if id(p) in lora_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    # A scalar scale of 0 skips the LoRA computation: no graph, no gradient to ψ.
    guidance.network.zero_grad(set_to_none=True)
    x.requires_grad_(True)
    with lora_scale(guidance.network, 0.0):
        guidance.velocity(x, t, y).sum().backward()
    assert all(p.grad is None for p in lora_parameters(guidance.network))


def test_per_sample_scale_on_conv2d_and_2d_linear_inputs(randomize_lora):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    names = inject_lora(model, LoraConfig(targets=("0", "re:[2]"), rank=2, init="kaiming"))
    assert names == ["0", "2"] and isinstance(model[0], LoraConv2d)
    randomize_lora(model)
    x = torch.randn(4, 3, 5, 5)
    scales = torch.tensor([0.0, 1.0, -1.5, 3.0])
    with lora_scale(model, scales):
        batched = model(x)
    for i, s in enumerate(scales.tolist()):
        with lora_scale(model, s):
            torch.testing.assert_close(batched[i : i + 1], model(x[i : i + 1]), **TIGHT)


def test_batch_dimension_mismatch_raises():
    class FoldsBatch(nn.Module):
        """Folds 2 "heads" into the batch before a Linear, as some attention code does."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            return self.proj(x.reshape(b * 2, -1, 4)).reshape(b, -1, 8)

    model = FoldsBatch()
    inject_lora(model, LoraConfig(targets=("proj",), rank=2))
    with lora_scale(model, torch.ones(3)), pytest.raises(ValueError, match=r"'proj'.*3 entries.*batch"):
        model(torch.randn(3, 5, 8))
    with lora_scale(model, 2.0):  # a scalar scale is fine
        model(torch.randn(3, 5, 8))


def test_pattern_errors():
    model = tiny_dit(num_layers=1)
    with pytest.raises(ValueError, match=r"'transformer_blocks\.\*\.attn1\.to_z' matched no"):
        inject_lora(
            model, LoraConfig(targets=("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_z"))
        )
    with pytest.raises(ValueError, match="unsupported modules"):
        inject_lora(model, LoraConfig(targets=("transformer_blocks.*.attn1",)))
    assert not list(lora_layers(model))  # nothing was wrapped before the error
    with pytest.raises(TypeError, match="sequence of patterns"):
        LoraConfig(targets="to_q")
    with pytest.raises(ValueError, match="empty"):
        LoraConfig(targets=())
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(targets=("x",), rank=0)
    with pytest.raises(ValueError, match="identifier"):
        LoraConfig(targets=("x",), adapter="a.b")
    with pytest.raises(ValueError, match="init"):
        LoraConfig(targets=("x",), init="zeros")


def test_scale_context_validation_and_restore(teacher):
    with pytest.raises(ValueError, match="no LoRA layers"), lora_scale(teacher.network, 1.0):
        pass
    inject_lora(teacher.network, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=2))
    layer = next(layer for _, layer in lora_layers(teacher.network))
    with pytest.raises(ValueError, match="shape"), lora_scale(teacher.network, torch.ones(2, 2)):
        pass
    with (
        pytest.raises(ValueError, match="floating"),
        lora_scale(teacher.network, torch.ones(2, dtype=torch.long)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="no LoRA adapter named 'critic'"),
        lora_scale(teacher.network, {"critic": 1.0}),
    ):
        pass
    with pytest.raises(RuntimeError), lora_scale(teacher.network, 2.0):
        assert layer.lora_scales["default"] == 2.0
        with lora_scale(teacher.network, 3.0):
            assert layer.lora_scales["default"] == 3.0
        assert layer.lora_scales["default"] == 2.0
        raise RuntimeError  # exits through the exception path
    assert layer.lora_scales["default"] == 1.0
    set_lora_scale(teacher.network, 0.5)
    assert layer.lora_scales["default"] == 0.5


def test_two_adapters_on_one_base(teacher, batch, randomize_lora):
    """A LoRA student and the LoRA critic sharing one frozen teacher (the memory-lean layout)."""
    x, t, y = batch
    base = teacher.velocity(x, t, y)
    inject_lora(teacher.network, LoraConfig(targets=DIT_LORA_TARGETS, rank=4, adapter="student"))
    inject_lora(teacher.network, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=2, adapter="critic"))
    randomize_lora(teacher.network)
    with lora_scale(teacher.network, {"student": 0.0, "critic": 0.0}):
        torch.testing.assert_close(teacher.velocity(x, t, y), base, rtol=0, atol=0)
    with lora_scale(teacher.network, 0.0, adapter="critic"):
        student_only = teacher.velocity(x, t, y)
    expected = merged_state_dict(teacher.network, {"student": 1.0})
    plain = tiny_dit().eval()
    plain.load_state_dict(expected)
    torch.testing.assert_close(student_only, plain(x, timestep=1000 * t, class_labels=y).sample, **TIGHT)
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(teacher.network, LoraConfig(targets=DIT_ATTENTION_TARGETS, adapter="critic"))
    assert len(list(lora_parameters(teacher.network, "critic"))) == 2 * 4 * 2


def test_merged_state_dict_and_merge_and_unload(teacher, batch, randomize_lora):
    x, t, y = batch
    inject_lora(teacher.network, LoraConfig(targets=(*DIT_LORA_TARGETS, "pos_embed.proj"), rank=3, alpha=6))
    randomize_lora(teacher.network, std=0.05)
    with lora_scale(teacher.network, 1.5):
        want = teacher.velocity(x, t, y)
    state = merged_state_dict(teacher.network, scale=1.5)
    assert set(state) == set(tiny_dit().state_dict())
    fresh = tiny_dit(seed=123).eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x, timestep=1000 * t, class_labels=y).sample, want, **TIGHT)
    unloaded = merge_and_unload(copy.deepcopy(teacher.network), scale=1.5)
    assert not list(lora_layers(unloaded)) and type(unloaded.pos_embed.proj) is nn.Conv2d
    torch.testing.assert_close(unloaded(x, timestep=1000 * t, class_labels=y).sample, want, **TIGHT)


def test_lora_factors_are_fp32_on_a_bf16_base():
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    model = nn.Sequential(layer)
    inject_lora(model, LoraConfig(targets=("0",), rank=2))
    assert model[0].lora_A["default"].weight.dtype == torch.float32
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_make_student_full_and_lora(teacher, batch):
    x, t, y = batch
    teacher.network.requires_grad_(False)
    full = make_student(teacher)
    assert full is not teacher and full.network is not teacher.network
    assert all(p.requires_grad for p in full.network.parameters())
    torch.testing.assert_close(full.velocity(x, t, y), teacher.velocity(x, t, y), rtol=0, atol=0)
    with torch.no_grad():
        next(full.network.parameters()).add_(1.0)
    assert not torch.equal(next(full.network.parameters()), next(teacher.network.parameters()))

    student = make_student(teacher, lora=LoraConfig(targets=DIT_LORA_TARGETS, rank=8, alpha=16))
    trainable = {id(p) for p in student.network.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(student.network)}
    assert not list(lora_layers(teacher.network))

    make_guidance(teacher, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=2))
    with pytest.raises(ValueError, match="make the student before"):
        make_student(teacher)


def test_per_sample_scale_of_the_wrong_length_is_refused(teacher, batch):
    x, t, y = batch
    inject_lora(teacher.network, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=2))
    with pytest.raises(ValueError, match="scale"), lora_scale(teacher.network, torch.ones(2)):
        teacher.velocity(x, t, y)
    with lora_scale(teacher.network, torch.ones(3)):
        assert teacher.velocity(x, t, y).shape == x.shape
