"""Teacher-vs-student comparison for text-to-image (dmdr_fast.eval.t2i) on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch

from dmdr_fast.eval.t2i import compare_t2i, format_comparison, scorers_from_rewards
from dmdr_fast.rewards import CallableReward, RewardSpec

PROMPTS = ["a", "b", "c"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _images(seed: int, k: int = 2, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((len(PROMPTS) * k, 3, 8, 8), generator=g) * 0.5 + offset).clamp(0, 1)


def test_scores_win_rates_and_standard_errors_by_hand():
    teacher, student = _images(0), _images(1, offset=0.3)  # the student is brighter on every prompt
    r = compare_t2i(
        {"teacher": teacher, "student": student}, PROMPTS, per_prompt=2, scorers={"b": brightness}
    )
    s = r["models"]["student"]
    per_prompt = student.mean(dim=(1, 2, 3)).double().view(3, 2).mean(dim=1)
    assert s["score/b"] == pytest.approx(float(student.double().mean()), rel=1e-6)
    assert s["score_se/b"] == pytest.approx(float(per_prompt.std() / math.sqrt(3)), rel=1e-6)
    assert s["win_rate/b"] == 1.0
    assert "win_rate/b" not in r["models"]["teacher"] and "fd_to_reference" not in r["models"]["teacher"]
    assert r["reference"] == "teacher" and (r["num_prompts"], r["per_prompt"]) == (3, 2)


def test_identical_models_tie_and_do_not_drift():
    x = _images(0)
    r = compare_t2i({"t": x, "s": x.clone()}, PROMPTS, per_prompt=2, scorers={"b": brightness})
    assert r["models"]["s"]["win_rate/b"] == 0.5  # ties count one half
    assert r["models"]["s"]["fd_to_reference"] == pytest.approx(0.0, abs=1e-6)


def test_collapse_shows_as_zero_diversity_and_drift():
    teacher = _images(0)
    collapsed = _images(1)[::2].repeat_interleave(2, dim=0)  # both samples of a prompt identical
    r = compare_t2i({"teacher": teacher, "student": collapsed}, PROMPTS, per_prompt=2)
    assert r["models"]["student"]["diversity_pixel"] == pytest.approx(0.0, abs=1e-12)
    assert r["models"]["teacher"]["diversity_pixel"] > 0.1
    assert r["models"]["student"]["fd_to_reference"] > 0


def test_feature_diversity_uses_the_given_features():
    x = _images(0)
    r = compare_t2i({"m": x}, PROMPTS, per_prompt=2, features=lambda im: im.mean(dim=(2, 3)))
    row = r["models"]["m"]
    f = x.mean(dim=(2, 3)).double().view(3, 2, 3)
    want = float((f[:, 0] - f[:, 1]).norm(dim=-1).mean())
    assert row["diversity_feat"] == pytest.approx(want, rel=1e-6)
    assert r["feature_dim"] == 3 and r["features"] == "given"


def test_one_sample_per_prompt_has_no_diversity():
    r = compare_t2i({"m": _images(0, k=1)}, PROMPTS, per_prompt=1)
    assert "diversity_pixel" not in r["models"]["m"]


def test_reward_scorers_use_raw_scores_not_the_loss():
    reward = CallableReward(
        lambda im, c: im.mean(dim=(1, 2, 3)), spec=RewardSpec("bright", loss_form="hinge", margin=0.9)
    )
    x = _images(0)
    r = compare_t2i({"m": x}, PROMPTS, per_prompt=2, scorers=scorers_from_rewards([reward]))
    assert r["models"]["m"]["score/bright"] == pytest.approx(float(x.double().mean()), rel=1e-6)


def test_table_lists_every_model_and_metric():
    r = compare_t2i({"t": _images(0), "s": _images(1)}, PROMPTS, per_prompt=2, scorers={"b": brightness})
    text = format_comparison(r)
    assert "| t |" in text and "| s |" in text and "win_rate/b" in text and " ± " in text
    assert "3 prompts × 2 samples" in text


@pytest.mark.parametrize(
    "images,prompts,k,match",
    [
        ({}, PROMPTS, 2, "at least one model"),
        ({"m": torch.rand(5, 3, 8, 8)}, PROMPTS, 2, r"\(len\(prompts\)·per_prompt = 6"),
        ({"m": torch.rand(6, 3, 8, 8)}, [], 2, "non-empty list"),
        ({"m": torch.rand(6, 3, 8, 8)}, PROMPTS, 0, "per_prompt"),
    ],
)
def test_bad_inputs_are_refused(images, prompts, k, match):
    with pytest.raises(ValueError, match=match):
        compare_t2i(images, prompts, per_prompt=k)


def test_unknown_reference_and_bad_scorer_are_refused():
    with pytest.raises(ValueError, match="reference 'x'"):
        compare_t2i({"m": _images(0)}, PROMPTS, per_prompt=2, reference="x")
    with pytest.raises(ValueError, match="finite scores"):
        compare_t2i(
            {"m": _images(0)},
            PROMPTS,
            per_prompt=2,
            scorers={"nan": lambda im, p: im.sum((1, 2, 3)) * math.nan},
        )


def test_grid_of_large_images_is_thumbnailed(tmp_path):
    from PIL import Image

    from dmdr_fast.eval.t2i import save_t2i_grid

    big = torch.rand(4, 3, 512, 384)
    path = save_t2i_grid({"teacher": big, "student": big}, ["a cat", "a dog"], 2, tmp_path / "g.png", cell=64)
    w, h = Image.open(path).size
    assert h < 3 * 64 + 40 and w < 2 * (2 * 64 + 10) + 200  # cells ~64 px, not 512


def _write_images(folder, arrays):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (mode, a) in enumerate(arrays):
        Image.fromarray(a, mode=mode).save(folder / f"{i:03d}.png")


def test_real_image_folder_is_cropped_resized_and_featurised(tmp_path):
    import numpy as np

    from dmdr_fast.eval.t2i import image_folder_features

    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black
    gray = np.full((8, 8), 128, dtype=np.uint8)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    _write_images(tmp_path / "real", [("RGB", wide), ("L", gray), ("RGBA", rgba)])
    (tmp_path / "real" / "notes.txt").write_text("not an image")
    seen = []

    def features(x):
        seen.append(x)
        return x.mean(dim=(2, 3))

    f = image_folder_features(tmp_path / "real", features, size=(4, 4), batch_size=2)
    assert f.shape == (3, 3) and [tuple(x.shape) for x in seen] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    torch.testing.assert_close(f[0], torch.ones(3), atol=0.02, rtol=0)  # centre crop: all white
    torch.testing.assert_close(f[1], torch.full((3,), 128 / 255), atol=1e-3, rtol=0)  # gray → RGB
    torch.testing.assert_close(f[2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-3, rtol=0)  # alpha dropped
    assert image_folder_features(tmp_path / "real", None, size=(4, 4), limit=2).shape == (2, 3 * 16 * 16)
    with pytest.raises(ValueError, match="no images"):
        image_folder_features(tmp_path / "real", features, size=(4, 4), limit=0)


def test_distance_to_real_images_ranks_the_closer_model_first():
    real = _images(10, k=40).mean(dim=(2, 3))  # features: per-channel means
    close, far = _images(11, k=2), _images(12, k=2, offset=0.4)
    result = compare_t2i(
        {"teacher": close, "student": far},
        PROMPTS,
        per_prompt=2,
        features=lambda x: x.mean(dim=(2, 3)),
        real_features=real,
    )
    t, s = result["models"]["teacher"], result["models"]["student"]
    assert result["num_real"] == len(real)
    assert t["fd_to_real"] < s["fd_to_real"] and t["mmd_to_real"] < s["mmd_to_real"]
    assert "fd_to_real" in format_comparison(result) and "not Inception FID" in format_comparison(result)
    with pytest.raises(ValueError, match="same features function"):
        compare_t2i({"a": close}, PROMPTS, per_prompt=2, real_features=real)  # pixel features: 768-dim
