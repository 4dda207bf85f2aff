"""CLIP score and PickScore rewards on a tiny random-weight CLIP built from config (no downloads)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dmdr_fast.rewards import (  # noqa: E402
    CLIP_HUB_ID,
    PICKSCORE_HUB_ID,
    PICKSCORE_PROCESSOR_HUB_ID,
    CLIPScoreReward,
    CompositeReward,
    MissingWeightsError,
    PickScoreReward,
    RewardSpec,
)
from dmdr_fast.rewards.preprocess import clip_preprocess  # noqa: E402

PROMPTS = ["a cat", "the dog", "a red bird"]


def write_tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (+ a few merges), written as vocab.json + merges.txt.

    Every lowercase letter has a word-final form, so no prompt of letters and spaces hits the
    unknown token (which for CLIP is the end-of-text token the text pooling looks for).
    """
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "th", "the</w>", "ca", "cat</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def make_tiny_clip(tokenizer, *, projection_dim: int = 16, seed: int = 0):
    """A 2-layer, 32-wide CLIP on 32×32 images with patch 8 and the tokenizer's special tokens."""
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Run the tiny models on one thread: they gain nothing from more, and on a shared machine
    the intra-op thread pool's spin-waiting makes each forward ~100x slower under contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def clip(tokenizer):
    return make_tiny_clip(tokenizer)


@pytest.fixture
def images() -> torch.Tensor:
    # Non-square and larger than the model's 32 px: exercises resize + center crop.
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))


def reference_cosine(model, tokenizer, images, prompts):
    """Cosine of image and text embeddings through transformers' own CLIPModel.forward."""
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=clip_preprocess(images, 32),
        )
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_clip_score_matches_clip_forward(clip, tokenizer, images):
    ref = reference_cosine(clip, tokenizer, images, PROMPTS)
    reward = CLIPScoreReward(clip, tokenizer)
    assert reward.spec == RewardSpec("clip")  # the default spec
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert bool(((scores >= -1) & (scores <= 1)).all())
    torch.testing.assert_close(scores.detach(), ref, rtol=1e-5, atol=1e-5)
    scaled = CLIPScoreReward(clip, tokenizer, spec=RewardSpec("c2"), scale=2.5)
    torch.testing.assert_close(scaled(images, PROMPTS).detach(), 2.5 * ref, rtol=1e-5, atol=1e-5)
    assert reward.image_size == 32 and reward.max_length == 24


def test_clip_gradients_reach_images_not_model(clip, tokenizer, images):
    # margin 2: hinge active
    reward = CLIPScoreReward(clip, tokenizer, spec=RewardSpec("clip", loss_form="hinge", margin=2.0))
    x = images.clone().requires_grad_(True)
    reward.loss(x, PROMPTS).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in clip.parameters())
    assert not clip.training
    reward.train()  # a Trainer calling .train() on a parent must not enable dropout
    assert not clip.training


def test_grayscale_images_and_input_checks(clip, tokenizer):
    reward = CLIPScoreReward(clip, tokenizer)
    gray = torch.rand(2, 1, 32, 32)
    assert reward(gray, PROMPTS[:2]).shape == (2,)
    with pytest.raises(ValueError, match="prompt"):
        reward(gray, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="channels"):
        reward(torch.rand(2, 2, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(gray * 3, PROMPTS[:2])
    with pytest.raises(ValueError, match="scale"):
        CLIPScoreReward(clip, tokenizer, scale=0.0)


def test_prompt_prefix_changes_encoded_text(clip, tokenizer, images):
    plain = CLIPScoreReward(clip, tokenizer)
    prefixed = CLIPScoreReward(clip, tokenizer, spec=RewardSpec("p", prompt_prefix="the photo "))
    with torch.no_grad():
        s_prefixed = prefixed(images, PROMPTS)
        assert not torch.allclose(s_prefixed, plain(images, PROMPTS))
        torch.testing.assert_close(s_prefixed, plain(images, ["the photo " + p for p in PROMPTS]))
    assert list(prefixed._text_cache) == ["the photo " + p for p in PROMPTS]


def test_text_cache_hits_lru_and_invalidation(clip, tokenizer, images, monkeypatch):
    reward = CLIPScoreReward(clip, tokenizer, text_cache_size=2)
    encoded: list[list[str]] = []
    original = reward._encode_texts
    monkeypatch.setattr(reward, "_encode_texts", lambda texts: encoded.append(texts) or original(texts))
    with torch.no_grad():
        first = reward(images, ["a cat", "a cat", "the dog"])  # the repeat is encoded once
        assert encoded == [["a cat", "the dog"]] and reward.cache_misses == 2
        again = reward(images[[2, 0, 1]], ["the dog", "a cat", "a cat"])
        assert len(encoded) == 1 and reward.cache_hits == 2  # served from the cache
        torch.testing.assert_close(again, first[[2, 0, 1]])
        reward(images[:1], ["a red bird"])  # evicts the least recently used ("the dog")
        assert list(reward._text_cache) == ["a cat", "a red bird"]
        reward(images, PROMPTS)  # a batch larger than the cache still gets every embedding
        reward.to(torch.float64)  # moving/casting the model drops the cache (device/dtype may change)
        assert len(reward._text_cache) == 0
        uncached = CLIPScoreReward(clip.float(), tokenizer, spec=RewardSpec("u"), text_cache_size=0)
        torch.testing.assert_close(uncached(images, PROMPTS), reward.float()(images, PROMPTS))
        assert len(uncached._text_cache) == 0


def test_loss_forms_via_base_class(clip, tokenizer, images):
    with torch.no_grad():
        score = CLIPScoreReward(clip, tokenizer)(images, PROMPTS)
        hinge = CLIPScoreReward(
            clip, tokenizer, spec=RewardSpec("h", weight=2.0, loss_form="hinge", margin=0.7)
        )
        torch.testing.assert_close(hinge.loss(images, PROMPTS), 2.0 * torch.relu(0.7 - score))
        neg = CLIPScoreReward(clip, tokenizer, spec=RewardSpec("n", weight=0.5))
        torch.testing.assert_close(neg.loss(images, PROMPTS), -0.5 * score)
        out = CompositeReward([hinge, neg])(images, PROMPTS)
    torch.testing.assert_close(out.loss, 2.0 * torch.relu(0.7 - score) - 0.5 * score)
    assert set(out.logs) == {"reward/h", "reward/n", "reward_loss/h", "reward_loss/n"}


def test_bf16_model_gives_float32_scores(clip, tokenizer, images):
    with torch.no_grad():
        ref = CLIPScoreReward(clip, tokenizer)(images, PROMPTS)
    reward = CLIPScoreReward(make_tiny_clip(tokenizer), tokenizer, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reward.model.parameters())
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.detach(), ref, atol=0.05, rtol=0)
    scores.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all())


def test_clip_save_load_round_trip(clip, tokenizer, images, tmp_path):
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    spec = RewardSpec("clip", loss_form="hinge", margin=0.7)
    loaded = CLIPScoreReward.from_pretrained(tmp_path / "clip", spec=spec)
    assert loaded.spec is spec and loaded.name == "clip"
    assert all(not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS), CLIPScoreReward(clip, tokenizer)(images, PROMPTS))
    # A tokenizer stored elsewhere (here: the bare vocab.json + merges.txt) via tokenizer_path.
    clip.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(MissingWeightsError, match="tokenizer_path"):
        CLIPScoreReward.from_pretrained(tmp_path / "weights_only")
    split = CLIPScoreReward.from_pretrained(
        tmp_path / "weights_only", tokenizer_path=Path(tokenizer.name_or_path), dtype=torch.bfloat16
    )
    assert split(images, PROMPTS).dtype == torch.float32


def test_pickscore_scores_and_round_trip(clip, tokenizer, images, tmp_path):
    cos = reference_cosine(clip, tokenizer, images, PROMPTS)
    reward = PickScoreReward(clip, tokenizer)
    assert reward.name == "pickscore"
    with torch.no_grad():
        scores = reward(images, PROMPTS)
        torch.testing.assert_close(scores, clip.logit_scale.exp() * cos, rtol=1e-5, atol=1e-5)
        unit = PickScoreReward(clip, tokenizer, spec=RewardSpec("unit"), scale=float(clip.logit_scale.exp()))
        torch.testing.assert_close(unit(images, PROMPTS), cos, rtol=1e-5, atol=1e-5)
    # PickScore's repository holds only the model; the tokenizer is a separate download.
    clip.save_pretrained(tmp_path / "pickscore")
    with pytest.raises(MissingWeightsError, match=re.escape(PICKSCORE_PROCESSOR_HUB_ID)):
        PickScoreReward.from_pretrained(tmp_path / "pickscore")
    tokenizer.save_pretrained(tmp_path / "processor")
    loaded = PickScoreReward.from_pretrained(tmp_path / "pickscore", tokenizer_path=tmp_path / "processor")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS), scores)


def test_missing_weights_name_the_download(tmp_path):
    with pytest.raises(MissingWeightsError, match=re.escape(CLIP_HUB_ID)):
        CLIPScoreReward.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match=re.escape(PICKSCORE_HUB_ID)):
        PickScoreReward.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"config\.json"):
        CLIPScoreReward.from_pretrained(tmp_path / "empty")


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"dmdr-fast\[rewards\]"):
        CLIPScoreReward.from_pretrained(tmp_path)


def test_non_clip_model_is_rejected(tokenizer):
    with pytest.raises(TypeError, match="CLIP"):
        CLIPScoreReward(torch.nn.Linear(2, 2), tokenizer)


def test_text_embeddings_are_unit_norm(clip, tokenizer):
    emb = CLIPScoreReward(clip, tokenizer).text_embeds(PROMPTS)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(F.normalize(emb, dim=-1), emb)
