"""DiT adapter: protocol conformance, the flow-matching mapping, the null class, input errors."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.conditions import cat_conds, slice_cond
from dmdr_fast.models import DiTAdapter, FlowModelAdapter, dit_from_config, tiny_dit


def test_conforms_to_protocol(teacher, batch):
    x, t, y = batch
    assert isinstance(teacher, FlowModelAdapter)
    assert teacher.sample_shape == (1, 8, 8)
    assert teacher.network is teacher.transformer
    labels = teacher.encode_condition(y.tolist())
    assert labels.dtype == torch.long and labels.shape == (3,)
    v = teacher.velocity(x, t, labels)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
    both = cat_conds([labels, teacher.null_condition(2)])
    assert both.tolist() == [*y.tolist(), 10, 10]
    assert slice_cond(both, 3, 5).tolist() == [10, 10]
    images = teacher.decode(torch.linspace(-2, 2, 64).view(1, 1, 8, 8))
    assert images.shape == (1, 1, 8, 8) and images.min() == 0 and images.max() == 1


def test_velocity_feeds_scaled_continuous_timestep(teacher, batch):
    x, t, y = batch
    expected = teacher.transformer(x, timestep=1000 * t, class_labels=y).sample
    torch.testing.assert_close(teacher.velocity(x, t, y), expected, rtol=0, atol=0)
    # A scalar time is broadcast to the batch.
    torch.testing.assert_close(teacher.velocity(x, 0.25, y), teacher.velocity(x, torch.full((3,), 0.25), y))
    rounded = DiTAdapter(teacher.transformer, round_timesteps=True)
    expected = teacher.transformer(x, timestep=(1000 * t).round(), class_labels=y).sample
    torch.testing.assert_close(rounded.velocity(x, t, y), expected, rtol=0, atol=0)


def test_learned_sigma_keeps_first_half(batch):
    x, t, y = batch
    adapter = DiTAdapter(tiny_dit(learned_sigma=True)).eval()
    assert adapter.learned_sigma and adapter.transformer.out_channels == 2
    full = adapter.transformer(x, timestep=1000 * t, class_labels=y).sample
    torch.testing.assert_close(adapter.velocity(x, t, y), full[:, :1], rtol=0, atol=0)


def test_null_class_is_the_extra_embedding_row(teacher, batch):
    x, t, _ = batch
    null = teacher.null_condition(3)
    assert teacher.null_class == 10 and null.tolist() == [10, 10, 10]
    table = teacher.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11
    v_null = teacher.velocity(x, t, null)
    v_cls = teacher.velocity(x, t, torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(v_null, v_cls)
    dropped = teacher.drop_labels(torch.arange(10), 1.0)
    assert dropped.tolist() == [10] * 10
    assert teacher.drop_labels(torch.arange(10), 0.0).tolist() == list(range(10))


def test_builtin_label_dropout_is_off_in_training_mode(batch):
    x, t, y = batch
    adapter = DiTAdapter(tiny_dit()).train()
    first = adapter.velocity(x.repeat(8, 1, 1, 1), t.repeat(8), y.repeat(8))
    # Deterministic despite train mode: diffusers would drop ~10 % of labels per block here.
    torch.testing.assert_close(first, adapter.velocity(x.repeat(8, 1, 1, 1), t.repeat(8), y.repeat(8)))


def test_null_condition_requires_null_row(teacher):
    for block in teacher.transformer.transformer_blocks:
        block.norm1.emb.class_embedder.embedding_table = torch.nn.Embedding(10, 64)
    adapter = DiTAdapter(teacher.transformer)
    with pytest.raises(ValueError, match="null-class row"):
        adapter.null_condition(2)


def test_decode_range_and_decoder():
    adapter = DiTAdapter(tiny_dit(), pixel_range=(0.0, 2.0), clamp=False, decoder=lambda z: 2 * z)
    x = torch.full((1, 1, 8, 8), 0.75)
    torch.testing.assert_close(adapter.decode(x), torch.full_like(x, 0.75))


@pytest.mark.parametrize(
    ("x_shape", "t", "y", "match"),
    [
        ((3, 2, 8, 8), torch.rand(3), torch.zeros(3, dtype=torch.long), "channels"),
        ((3, 1, 8, 6), torch.rand(3), torch.zeros(3, dtype=torch.long), "square"),
        ((3, 1, 7, 7), torch.rand(3), torch.zeros(3, dtype=torch.long), "divisible"),
        ((1, 8, 8), torch.rand(3), torch.zeros(3, dtype=torch.long), r"\(B, C, H, W\)"),
        ((3, 1, 8, 8), torch.rand(2), torch.zeros(3, dtype=torch.long), r"t must have shape \(3,\)"),
        ((3, 1, 8, 8), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "floating"),
        ((3, 1, 8, 8), torch.rand(3), torch.zeros(3), "int64 class labels"),
        ((3, 1, 8, 8), torch.rand(3), torch.zeros(2, dtype=torch.long), "int64 class labels"),
    ],
)
def test_velocity_rejects_bad_inputs(teacher, x_shape, t, y, match):
    with pytest.raises(ValueError, match=match):
        teacher.velocity(torch.randn(x_shape), t, y)


def test_encode_condition_rejects_bad_labels(teacher):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        teacher.encode_condition([3, 10])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        teacher.encode_condition([-1])
    with pytest.raises(ValueError, match="integers"):
        teacher.encode_condition([0.5])
    assert teacher.encode_condition(7).tolist() == [7]
    with pytest.raises(ValueError, match="drop probability"):
        teacher.drop_labels(torch.arange(3), 1.5)


def test_constructor_errors():
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        DiTAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pixel_range"):
        DiTAdapter(tiny_dit(), pixel_range=(1.0, 1.0))


def test_dit_from_config_aliases_seed_and_errors():
    config = {"sample_size": 8, "patch_size": 2, "in_channels": 1, "num_layers": 1}
    config |= {"num_attention_heads": 2, "attention_head_dim": 8, "num_classes": 3, "learned_sigma": True}
    a, b = dit_from_config(config, seed=3), dit_from_config(config, seed=3)
    assert a.config.num_embeds_ada_norm == 3 and a.out_channels == 2
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    state = torch.random.get_rng_state()
    dit_from_config(config, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    with pytest.raises(ValueError, match="unknown DiT config keys"):
        dit_from_config({**config, "num_heads": 2})
    with pytest.raises(ValueError, match="not both"):
        dit_from_config({**config, "num_embeds_ada_norm": 3})
    with pytest.raises(ValueError, match="patch_size"):
        tiny_dit(sample_size=8, patch_size=3)
