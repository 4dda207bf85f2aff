"""ImageReward on a tiny random-weight BLIP: scores, gradients, prefix, upstream-checkpoint round trip, errors.

No real ImageReward weights are available offline; the round trip writes a tiny model in the
upstream layout (``ImageReward.pt`` flat state dict + ``med_config.json``) and checks the loaded
reward against (a) the tiny model and (b) an independent functional re-implementation of BLIP's
ViT + ``med.py`` BERT + the MLP head that reads the upstream keys directly.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

transformers = pytest.importorskip("transformers")

from dmdr_fast.rewards.image_reward import (  # noqa: E402
    BERT_TOKENIZER_SOURCE,
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageReward,
    ImageRewardModel,
    build_image_reward,
    image_reward_to_transformers_state_dict,
    load_image_reward_tokenizer,
    transformers_to_image_reward_state_dict,
)
from dmdr_fast.rewards.loading import MissingWeightsError  # noqa: E402
from dmdr_fast.rewards.preprocess import clip_preprocess  # noqa: E402
from dmdr_fast.rewards.spec import RewardSpec  # noqa: E402

WIDTH, HEADS, LAYERS, IMAGE, PATCH, TEXT_LN_EPS = 32, 2, 2, 32, 16, 1e-12
WORDS = ["a", "photo", "of", "the", "cat", "dog", "realistic", "red", ",", ".", "##s"]
PROMPTS = ["a photo of the cats.", "the red dog, realistic", "cat"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_tok")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (d / "vocab.txt").write_text("\n".join(special + WORDS) + "\n")
    return d


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_image_reward_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def blip_model(tokenizer):
    vision = transformers.BlipVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
    )
    text = transformers.BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        encoder_hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=40,
        layer_norm_eps=TEXT_LN_EPS,
        bos_token_id=None,  # the defaults (30522, 102) are outside the tiny vocabulary; unused here
        sep_token_id=None,
        is_decoder=True,
    )
    model = ImageRewardModel(vision, text).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial values everywhere so a misplaced key changes the output
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def reward(blip_model, tokenizer):
    return ImageReward(blip_model, tokenizer)


@pytest.fixture
def images() -> Tensor:
    return torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))


def _blip_reference(sd: dict[str, Tensor], pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Upstream's forward from its own keys: timm-style ViT, med.py BERT with cross-attention, MLP head."""

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def attend(q, k, v, additive):
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        return a.transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[v + "pos_embed"]
    for i in range(LAYERS):
        p = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, p + "norm1", 1e-6), p + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, None), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    h = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = ln(h, t + "embeddings.LayerNorm", TEXT_LN_EPS)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(LAYERS):
        p = f"{t}encoder.layer.{i}."
        a = attend(
            lin(h, p + "attention.self.query"),
            lin(h, p + "attention.self.key"),
            lin(h, p + "attention.self.value"),
            pad,
        )
        h = ln(lin(a, p + "attention.output.dense") + h, p + "attention.output.LayerNorm", TEXT_LN_EPS)
        c = p + "crossattention."
        a = attend(lin(h, c + "self.query"), lin(image, c + "self.key"), lin(image, c + "self.value"), None)
        h = ln(lin(a, c + "output.dense") + h, c + "output.LayerNorm", TEXT_LN_EPS)
        f = lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense")
        h = ln(f + h, p + "output.LayerNorm", TEXT_LN_EPS)
    r = h[:, 0]
    for n in (0, 2, 4, 6, 7):  # the Sequential's linear layers; dropout in between, no activations
        r = lin(r, f"mlp.layers.{n}")
    return (r.squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def test_tokenizer_matches_blip(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    assert ids == [len(WORDS) + 5, len(WORDS) + 6]  # appended after the vocabulary, in BLIP's order
    enc = tokenizer(["A Photo of the Cats."], padding="max_length", truncation=True, max_length=35)
    assert len(enc["input_ids"][0]) == 35
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0][:8]) == [
        "[CLS]", "a", "photo", "of", "the", "cat", "##s", ".",
    ]  # fmt: skip


def test_scores_shape_dtype_and_first_token(reward, blip_model, images):
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    ids, mask = reward.tokenize(PROMPTS)
    assert ids.shape == (3, 35) and bool(
        (ids[:, 0] == reward.tokenizer.cls_token_id).all()
    )  # upstream: [CLS]
    raw = blip_model(clip_preprocess(images, IMAGE), ids, mask)
    torch.testing.assert_close(scores, (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD, atol=1e-6, rtol=0)
    unnormalized = ImageReward(blip_model, reward.tokenizer, spec=RewardSpec("raw"), normalize=False)
    torch.testing.assert_close(unnormalized(images, PROMPTS), raw, atol=1e-6, rtol=0)


def test_gradients_reach_images_not_model(reward, images):
    x = images.clone().requires_grad_(True)
    reward.train()  # stays in eval mode: no dropout in the head or the encoders
    assert not reward.model.training and not reward.model.mlp.layers[1].training
    reward.loss(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.model.parameters())


def test_prompt_prefix_changes_the_encoded_text(reward, blip_model, images):
    prefixed = ImageReward(
        blip_model, reward.tokenizer, spec=RewardSpec("p", prompt_prefix="realistic photo ")
    )
    got = prefixed(images, PROMPTS)
    torch.testing.assert_close(got, reward(images, ["realistic photo " + p for p in PROMPTS]), atol=0, rtol=0)
    assert not torch.allclose(got, reward(images, PROMPTS))


def test_input_checks(reward, images):
    with pytest.raises(ValueError, match="prompt"):
        reward(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="channels"):
        reward(torch.rand(3, 4, 8, 8), PROMPTS)


def test_converter_is_a_bijection(blip_model):
    ours = blip_model.state_dict()
    upstream = transformers_to_image_reward_state_dict(ours)
    assert upstream["blip.visual_encoder.cls_token"].shape == (1, 1, WIDTH)
    assert upstream["blip.visual_encoder.blocks.1.attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
    assert "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight" in upstream
    assert {k for k in upstream if k.startswith("mlp.")} == {
        f"mlp.layers.{n}.{w}" for n in (0, 2, 4, 6, 7) for w in ("weight", "bias")
    }
    # The unused contrastive projections of the real checkpoint are dropped, unknown keys are not.
    extra = {"blip.vision_proj.weight": torch.zeros(4, WIDTH), "blip.text_proj.bias": torch.zeros(4)}
    back = image_reward_to_transformers_state_dict({**upstream, **extra})
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="does not know"):
        image_reward_to_transformers_state_dict({**upstream, "blip.itm_head.weight": torch.zeros(2, WIDTH)})


def test_upstream_checkpoint_round_trip(reward, tokenizer_dir, tmp_path, images):
    folder = reward.save_checkpoint(tmp_path / "ir")
    med = json.loads((folder / "med_config.json").read_text())
    assert (
        med["add_cross_attention"]
        and med["hidden_size"] == WIDTH
        and med["vocab_size"] == len(reward.tokenizer)
    )
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    assert "blip.text_encoder.embeddings.position_ids" in sd  # the persistent buffer of med.py
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    spec = RewardSpec("ir2", weight=0.3, loss_form="hinge", margin=0.5)
    loaded = build_image_reward(folder, spec=spec, vision_num_heads=HEADS)
    assert isinstance(loaded, ImageReward) and loaded.name == "ir2"
    assert loaded.spec is spec  # the reward's spec passes through whole
    with pytest.raises(TypeError, match="ratio"):  # combination policy is not the reward's
        build_image_reward(folder, vision_num_heads=HEADS, ratio=0.5)
    assert loaded.tokenizer.convert_tokens_to_ids("[ENC]") == reward.tokenizer.convert_tokens_to_ids("[ENC]")
    expected = reward(images, PROMPTS)
    torch.testing.assert_close(loaded(images, PROMPTS), expected, atol=1e-5, rtol=0)
    # Independent check of the key semantics: upstream's forward on the saved keys.
    ids, mask = reward.tokenize(PROMPTS)
    ref = _blip_reference(sd, clip_preprocess(images, IMAGE), ids, mask)
    torch.testing.assert_close(expected, ref, atol=1e-5, rtol=0)


def test_missing_weights_name_what_to_download(reward, tmp_path):
    with pytest.raises(MissingWeightsError, match="THUDM/ImageReward"):
        build_image_reward(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match=r"ImageReward\.pt"):
        build_image_reward(tmp_path)
    reward.save_checkpoint(tmp_path)  # no tokenizer next to it
    with pytest.raises(MissingWeightsError, match=BERT_TOKENIZER_SOURCE):
        build_image_reward(tmp_path, vision_num_heads=HEADS)


def test_hub_id_that_cannot_be_fetched(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(MissingWeightsError, match=r"ImageReward\.pt from THUDM/ImageReward"):
        build_image_reward("THUDM/ImageReward")


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"dmdr-fast\[rewards\]"):
        build_image_reward(tmp_path)
