"""LAION aesthetic reward on a tiny random-weight CLIP + head (no downloads)."""

from __future__ import annotations

import re

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tests.rewards.test_clip_rewards import (  # noqa: E402
    make_tiny_clip,
    single_torch_thread,  # noqa: F401  (an autouse fixture: one thread for the tiny models)
    write_tiny_tokenizer,
)

from dmdr_fast.rewards import (  # noqa: E402
    AESTHETIC_MLP_FILENAME,
    AESTHETIC_MLP_URL,
    CLIP_HUB_ID,
    AestheticMLP,
    AestheticReward,
    MissingWeightsError,
    RewardSpec,
)
from dmdr_fast.rewards.preprocess import clip_preprocess  # noqa: E402

EMBED = 16  # the tiny CLIP's projection_dim


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def clip(tokenizer):
    return make_tiny_clip(tokenizer, projection_dim=EMBED)


@pytest.fixture
def head() -> AestheticMLP:
    torch.manual_seed(2)
    return AestheticMLP(EMBED)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 36, 32, generator=torch.Generator().manual_seed(3))


def test_head_layout_matches_published_checkpoint():
    state = AestheticMLP().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }


def test_score_is_head_of_normalised_clip_embedding(clip, head, images):
    reward = AestheticReward(clip, head)
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=clip_preprocess(images, 32))
        feats = getattr(feats, "pooler_output", feats)  # tensor in transformers < 5
        ref = head(F.normalize(feats, dim=-1)).squeeze(-1)
        scores = reward(images, None)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref)
    # Unconditional: labels and prompts are accepted and ignored; no dropout even after .train().
    reward.train()
    with torch.no_grad():
        torch.testing.assert_close(reward(images, torch.arange(4)), scores)
        torch.testing.assert_close(reward(images, ["a", "b", "c", "d"]), scores)


def test_gradients_reach_images(clip, head, images):
    reward = AestheticReward(clip, head, spec=RewardSpec("aesthetic", loss_form="hinge", margin=100.0))
    x = images.clone().requires_grad_(True)
    reward.loss(x, None).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())


def test_bf16_clip_keeps_float32_head_and_scores(tokenizer, clip, head, images):
    with torch.no_grad():
        ref = AestheticReward(clip, head)(images, None)
    # A fresh copy (same seed, same weights): the module-scoped fixture must stay float32.
    reward = AestheticReward(make_tiny_clip(tokenizer, projection_dim=EMBED), head, dtype=torch.bfloat16)
    assert next(reward.clip.parameters()).dtype == torch.bfloat16
    assert next(reward.mlp.parameters()).dtype == torch.float32
    with torch.no_grad():
        scores = reward(images, None)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=0.05, rtol=0)


def test_head_input_size_must_match_clip(clip):
    with pytest.raises(ValueError, match=r"768.*16"):
        AestheticReward(clip, AestheticMLP(768))


def test_save_load_round_trip(clip, head, images, tmp_path):
    clip.save_pretrained(tmp_path / "clip")
    torch.save(head.state_dict(), tmp_path / "head.pth")
    loaded = AestheticReward.from_pretrained(tmp_path / "clip", tmp_path / "head.pth", spec=RewardSpec("aes"))
    assert loaded.name == "aes"
    # Without mlp_path the head is looked up under its published name inside the CLIP folder.
    torch.save(head.state_dict(), tmp_path / "clip" / AESTHETIC_MLP_FILENAME)
    found = AestheticReward.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        ref = AestheticReward(clip, head)(images, None)
        torch.testing.assert_close(loaded(images, None), ref)
        torch.testing.assert_close(found(images, None), ref)
    assert loaded.name == "aes" and found.name == "aesthetic"
    # A head for another CLIP is refused at load time.
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="projection_dim"):
        AestheticReward.from_pretrained(tmp_path / "clip", tmp_path / "l14.pth")


def test_missing_weights_name_the_downloads(clip, tmp_path):
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(MissingWeightsError, match="improved-aesthetic-predictor"):
        AestheticReward.from_pretrained(tmp_path / "clip")
    with pytest.raises(MissingWeightsError, match="improved-aesthetic-predictor"):
        AestheticReward.from_pretrained(tmp_path / "clip", tmp_path / "missing.pth")
    torch.save(AestheticMLP(EMBED).state_dict(), tmp_path / "head.pth")
    with pytest.raises(MissingWeightsError, match=re.escape(CLIP_HUB_ID)):
        AestheticReward.from_pretrained(tmp_path / "no_clip", tmp_path / "head.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"layers\.0\.weight"):
        AestheticMLP.load(tmp_path / "bad.pth")
    assert AESTHETIC_MLP_URL.endswith("sac%2Blogos%2Bava1-l14-linearMSE.pth")
