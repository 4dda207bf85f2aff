"""HPSReward on a tiny random-weight CLIPModel: scores, gradients, prefix, upstream-checkpoint round trip, errors.

No real HPS weights are available offline; the round trip writes a tiny model in the upstream
``HPS_v2.1_compressed.pt`` layout (open_clip keys under ``"state_dict"``) and checks the loaded
reward against (a) the tiny CLIPModel and (b) an independent functional re-implementation of
open_clip's ViT-CLIP forward that reads the open_clip keys directly.
"""

from __future__ import annotations

import json
import string
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

transformers = pytest.importorskip("transformers")

from dmdr_fast.rewards.hps import (  # noqa: E402
    HPS_TOKENIZER_SOURCE,
    HPSReward,
    build_hps,
    clip_config_from_open_clip_state_dict,
    open_clip_to_transformers_state_dict,
    transformers_to_open_clip_state_dict,
)
from dmdr_fast.rewards.loading import MissingWeightsError  # noqa: E402
from dmdr_fast.rewards.spec import RewardSpec  # noqa: E402

WIDTH, HEADS, LAYERS, EMBED, IMAGE, PATCH, CONTEXT = 32, 2, 2, 16, 32, 8, 16
PROMPTS = ["the cat", "a photo of the cat, realistic", "dog"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny OpenAI-style BPE: characters, word-final characters, a few merges, sot/eot last."""
    d = tmp_path_factory.mktemp("clip_tok")
    chars = list(string.ascii_lowercase) + list(",.!'")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["t h", "th e</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (biases and LayerNorms too) so a misplaced key changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.add_(1.0)


@pytest.fixture(scope="module")
def clip_model(tokenizer_dir):
    vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text()))
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=WIDTH,
            intermediate_size=4 * WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=CONTEXT,
            hidden_act="gelu",
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=0,
            projection_dim=EMBED,
        ),
        vision_config=dict(
            hidden_size=WIDTH,
            intermediate_size=4 * WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            image_size=IMAGE,
            patch_size=PATCH,
            hidden_act="gelu",
            projection_dim=EMBED,
        ),
        projection_dim=EMBED,
    )
    model = transformers.CLIPModel(config).eval()
    _randomize(model, 0)
    return model


@pytest.fixture(scope="module")
def reward(clip_model, tokenizer_dir):
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return HPSReward(clip_model, tok)


@pytest.fixture
def images() -> Tensor:
    # Not square and not the model size: exercises resize of the shorter side + center crop.
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))


def _direct_cosine(model, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)
    return F.cosine_similarity(img, txt, dim=-1)


def _open_clip_reference(sd: dict[str, Tensor], pixels: Tensor, ids: Tensor, heads: int) -> Tensor:
    """open_clip's ViT-CLIP forward from its own keys (pre-LN blocks, nn.MultiheadAttention packing)."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def block(x, p, causal):
        b, n, d = x.shape
        qkv = F.linear(ln(x, p + "ln_1"), sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"])
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        return x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = ln(torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"], "visual.ln_pre")
    for i in range(LAYERS):
        x = block(x, f"visual.transformer.resblocks.{i}.", causal=False)
    img = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]

    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    for i in range(LAYERS):
        t = block(t, f"transformer.resblocks.{i}.", causal=True)
    t = ln(t, "ln_final")
    txt = t[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def test_scores_shape_dtype_and_value(reward, clip_model, images):
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert bool(((scores >= -1) & (scores <= 1)).all())
    # Same as the CLIPModel on the CLIP-preprocessed pixels.
    from dmdr_fast.rewards.preprocess import clip_preprocess

    ids, mask = reward.tokenize(PROMPTS)
    assert ids.shape == (3, CONTEXT)
    expected = _direct_cosine(clip_model, clip_preprocess(images, IMAGE), ids, mask)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    scaled = HPSReward(clip_model, reward.tokenizer, spec=RewardSpec("hps100"), scale=100.0)
    torch.testing.assert_close(scaled(images, PROMPTS), 100 * scores, atol=1e-4, rtol=0)


def test_gradients_reach_images_not_model(reward, images):
    x = images.clone().requires_grad_(True)
    reward.train()  # stays in eval mode
    assert not reward.model.training
    HPSReward.loss(reward, x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.model.parameters())
    gray = images[:, :1].clone().requires_grad_(True)  # single channel is repeated to RGB
    reward(gray, PROMPTS).sum().backward()
    assert torch.isfinite(gray.grad).all() and gray.grad.abs().sum() > 0


def test_prompt_prefix_changes_the_encoded_text(reward, clip_model, images):
    prefixed = HPSReward(clip_model, reward.tokenizer, spec=RewardSpec("p", prompt_prefix="realistic photo "))
    got = prefixed(images, PROMPTS)
    torch.testing.assert_close(got, reward(images, ["realistic photo " + p for p in PROMPTS]), atol=0, rtol=0)
    assert not torch.allclose(got, reward(images, PROMPTS))


def test_input_checks(reward, images):
    with pytest.raises(ValueError, match="prompt"):
        reward(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="2 prompts"):
        reward(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="channels"):
        reward(torch.rand(3, 2, 8, 8), PROMPTS)


def test_converter_is_a_bijection(clip_model):
    hf = clip_model.state_dict()
    oc = transformers_to_open_clip_state_dict(hf)
    assert oc["visual.proj"].shape == (WIDTH, EMBED) and oc["text_projection"].shape == (WIDTH, EMBED)
    assert oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)
    back = open_clip_to_transformers_state_dict({"module." + k: v for k, v in oc.items()}, clip_model.config)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(ValueError, match="does not know"):
        open_clip_to_transformers_state_dict(
            {**oc, "visual.transformer.resblocks.0.ls_1.gamma": oc["ln_final.bias"]}
        )
    config = clip_config_from_open_clip_state_dict(
        oc, vision_head_width=WIDTH // HEADS, text_head_width=WIDTH // HEADS
    )
    assert config.vision_config.image_size == IMAGE and config.vision_config.patch_size == PATCH
    assert (
        config.text_config.num_attention_heads == HEADS and config.vision_config.num_hidden_layers == LAYERS
    )
    assert config.text_config.max_position_embeddings == CONTEXT and config.projection_dim == EMBED


def test_upstream_checkpoint_round_trip(reward, clip_model, tokenizer_dir, tmp_path, images):
    folder = tmp_path / "hps"
    ckpt = reward.save_checkpoint(folder / "HPS_v2.1_compressed.pt")
    raw = torch.load(ckpt, weights_only=True)
    assert set(raw) == {"state_dict"} and "visual.conv1.weight" in raw["state_dict"]
    reward.tokenizer.save_pretrained(str(folder / "tokenizer"))
    spec = RewardSpec("hps2", weight=0.3, loss_form="hinge", margin=0.7)
    loaded = build_hps(
        folder,
        spec=spec,  # the reward's spec passes through whole
        vision_head_width=WIDTH // HEADS,
        text_head_width=WIDTH // HEADS,
        scale=1.0,
    )
    assert isinstance(loaded, HPSReward) and loaded.name == "hps2"
    assert loaded.spec is spec
    with pytest.raises(TypeError, match="combine"):  # combination policy is not the reward's
        build_hps(
            folder, vision_head_width=WIDTH // HEADS, text_head_width=WIDTH // HEADS, combine="balanced"
        )
    expected = reward(images, PROMPTS)
    torch.testing.assert_close(loaded(images, PROMPTS), expected, atol=1e-5, rtol=0)
    # Independent check of the key semantics: open_clip's forward on the saved keys.
    from dmdr_fast.rewards.preprocess import clip_preprocess

    ids, _ = reward.tokenize(PROMPTS)
    ref = _open_clip_reference(raw["state_dict"], clip_preprocess(images, IMAGE), ids, HEADS)
    torch.testing.assert_close(expected, ref, atol=1e-5, rtol=0)
    # A checkpoint file with the tokenizer given explicitly, and a dtype given by name.
    direct = build_hps(
        ckpt,
        tokenizer=tokenizer_dir,
        vision_head_width=WIDTH // HEADS,
        text_head_width=WIDTH // HEADS,
        dtype="float32",
    )
    torch.testing.assert_close(direct(images, PROMPTS), expected, atol=1e-5, rtol=0)


def test_missing_weights_name_what_to_download(reward, tmp_path):
    with pytest.raises(MissingWeightsError, match="xswu/HPSv2"):
        build_hps(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match=r"HPS_v2\.1_compressed\.pt"):
        build_hps(tmp_path)
    reward.save_checkpoint(tmp_path / "HPS_v2_compressed.pt")  # no tokenizer next to it
    with pytest.raises(MissingWeightsError, match=HPS_TOKENIZER_SOURCE):
        build_hps(tmp_path, vision_head_width=WIDTH // HEADS, text_head_width=WIDTH // HEADS)


def test_hub_id_that_cannot_be_fetched(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(MissingWeightsError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        build_hps("xswu/HPSv2")


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"dmdr-fast\[rewards\]"):
        build_hps(tmp_path)
