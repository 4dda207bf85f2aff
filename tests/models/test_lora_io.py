"""LoRA files: peft/diffusers layout, save → load round trip, loading by diffusers/peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmdr_fast.models import (
    ADAPTER_CONFIG_NAME,
    DIT_ATTENTION_TARGETS,
    DIT_LORA_TARGETS,
    LORA_WEIGHTS_NAME,
    DiTAdapter,
    LoraConfig,
    inject_lora,
    load_lora,
    lora_layers,
    lora_parameters,
    lora_scale,
    lora_state_dict,
    save_lora,
    tiny_dit,
)

CONFIG = LoraConfig(targets=(*DIT_LORA_TARGETS, "pos_embed.proj"), rank=4, alpha=8)


@pytest.fixture
def trained(teacher, randomize_lora) -> DiTAdapter:
    """The teacher with a randomised (as if trained) rank-4, alpha-8 LoRA."""
    inject_lora(teacher.network, CONFIG)
    randomize_lora(teacher.network)
    return teacher


def test_file_layout_is_peft_diffusers(trained, tmp_path):
    path = save_lora(trained.network, tmp_path)
    assert path == tmp_path / LORA_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
        a = f.get_tensor("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight")
        b = f.get_tensor("transformer.transformer_blocks.0.attn1.to_q.lora_B.weight")
        conv_a = f.get_tensor("transformer.pos_embed.proj.lora_A.weight")
    assert len(keys) == 2 * 13 and all(k.startswith("transformer.") for k in keys)
    assert a.shape == (4, 64) and b.shape == (64, 4) and conv_a.shape == (4, 1, 2, 2)
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    assert "transformer_blocks.1.ff.net.2" in meta["transformer.target_modules"]
    peft_json = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert peft_json["peft_type"] == "LORA" and peft_json["r"] == 4 and peft_json["lora_alpha"] == 8
    assert sorted(peft_json["target_modules"]) == sorted(
        k.split(".", 1)[1][: -len(".lora_A.weight")] for k in keys if "lora_A" in k
    )


def test_save_load_round_trip_into_a_fresh_model(trained, tmp_path, batch):
    x, t, y = batch
    save_lora(trained.network, tmp_path)
    with lora_scale(trained.network, torch.tensor([0.0, 1.0, 2.0])):
        want = trained.velocity(x, t, y)

    fresh = DiTAdapter(tiny_dit(seed=0)).eval()  # same base weights, no LoRA yet
    names = load_lora(fresh.network, tmp_path)
    assert names == sorted(name for name, _ in lora_layers(trained.network))
    layer = fresh.network.get_submodule("transformer_blocks.0.attn1.to_q")
    assert layer.lora_rank["default"] == 4 and layer.lora_alpha["default"] == 8.0
    assert {id(p) for p in fresh.network.parameters() if p.requires_grad} == {
        id(p) for p in lora_parameters(fresh.network)
    }
    with lora_scale(fresh.network, torch.tensor([0.0, 1.0, 2.0])):
        torch.testing.assert_close(fresh.velocity(x, t, y), want, rtol=0, atol=0)

    # Loading into an existing adapter copies the factors in place.
    other = DiTAdapter(tiny_dit(seed=0)).eval()
    inject_lora(other.network, CONFIG)
    load_lora(other.network, tmp_path / LORA_WEIGHTS_NAME)
    with lora_scale(other.network, torch.tensor([0.0, 1.0, 2.0])):
        torch.testing.assert_close(other.velocity(x, t, y), want, rtol=0, atol=0)


def test_load_rejects_mismatches(trained, tmp_path):
    save_lora(trained.network, tmp_path)
    wrong_alpha = tiny_dit()
    inject_lora(wrong_alpha, LoraConfig(targets=CONFIG.targets, rank=4, alpha=4))
    with pytest.raises(ValueError, match="alpha"):
        load_lora(wrong_alpha, tmp_path)
    fewer = tiny_dit()
    inject_lora(fewer, LoraConfig(targets=DIT_ATTENTION_TARGETS, rank=4, alpha=8))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora(fewer, tmp_path)
    with pytest.raises(ValueError, match="does not have"):
        load_lora(tiny_dit(num_layers=1), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_lora(tiny_dit(), tmp_path / "missing")
    save_file(
        {"transformer.proj_out_1.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "kohya.safetensors")
    )
    with pytest.raises(ValueError, match="unsupported keys"):
        load_lora(tiny_dit(), tmp_path / "kohya.safetensors")


def test_file_without_metadata_means_alpha_equals_rank(trained, tmp_path):
    # A plain peft-style file (PeftModel prefix, no header metadata): diffusers assumes alpha = rank.
    state = lora_state_dict(trained.network, prefix=None)
    save_file(
        {"base_model.model." + k: v for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors")
    )
    model = tiny_dit()
    load_lora(model, tmp_path / "adapter_model.safetensors")
    layer = model.get_submodule("transformer_blocks.0.attn1.to_q")
    assert layer.lora_alpha["default"] == 4.0


def test_dtype_and_no_prefix_on_save(trained, tmp_path):
    save_lora(trained.network, tmp_path, dtype=torch.bfloat16, prefix=None)
    with safe_open(str(tmp_path / LORA_WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert "pos_embed.proj.lora_A.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    model = tiny_dit()
    load_lora(model, tmp_path)  # default prefix "transformer": falls back to the unprefixed layout
    assert model.get_submodule("pos_embed.proj").lora_alpha["default"] == 8.0


def test_peft_loads_our_file_and_reproduces_outputs(trained, tmp_path, batch):
    """peft's own injection + state-dict loading (what diffusers' load_lora_adapter calls) gives
    the same outputs as our LoRA at scale 1."""
    peft = pytest.importorskip("peft")
    x, t, y = batch
    save_lora(trained.network, tmp_path)
    want = trained.velocity(x, t, y)
    with safe_open(str(tmp_path / LORA_WEIGHTS_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = peft.LoraConfig(**{k.removeprefix("transformer."): v for k, v in meta.items()})
    model = tiny_dit(seed=0).eval()
    model = peft.inject_adapter_in_model(config, model, adapter_name="default")
    result = peft.set_peft_model_state_dict(model, state, adapter_name="default")
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    got = model(x, timestep=1000 * t, class_labels=y).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_load_lora_adapter_reproduces_outputs(tmp_path):
    """A diffusers transformer with PeftAdapterMixin (tiny SD3) loads our file via load_lora_adapter."""
    pytest.importorskip("peft")
    from diffusers import SD3Transformer2DModel

    def build() -> SD3Transformer2DModel:
        torch.manual_seed(0)
        return SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=8,
        ).eval()

    targets = tuple(
        f"transformer_blocks.*.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj")
    )
    ours = build()
    inject_lora(ours, LoraConfig(targets=targets, rank=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.normal_(std=0.1)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.tensor([100.0, 700.0]),
    }
    want = ours(**inputs).sample
    save_lora(ours, tmp_path)
    theirs = build()
    theirs.load_lora_adapter(
        str(tmp_path),
        weight_name="pytorch_lora_weights.safetensors",
        prefix="transformer",
        adapter_name="dmdr",
    )
    torch.testing.assert_close(theirs(**inputs).sample, want, rtol=1e-5, atol=1e-5)
