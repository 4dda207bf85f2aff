"""Text-to-image evaluation: a student against its teacher on held-out prompts.

What a user judges a distillation by, on the same prompts for every model (``K`` samples per
prompt, stored prompt-major: the K samples of prompt ``i`` are rows ``i·K … i·K + K − 1``):

* **scores**: each scorer's raw score (CLIP cosine, HPS, PickScore...; not the training loss),
  mean over all samples and the standard error over prompts (a prompt's K samples are averaged
  first, since samples of one prompt are not independent);
* **win rate** against the reference model (the teacher): the fraction of prompts whose mean
  score beats the reference's on the same prompt (ties count one half);
* **diversity**: the mean pairwise distance between the K samples of a prompt, in pixel space
  (images average-pooled to 16×16) and, when given, in a feature space (e.g. CLIP image
  embeddings). A student that beats the teacher on the reward with much lower diversity has
  collapsed onto what the reward likes — the reward-hacking signature;
* **FD to the reference**: Fréchet distance between the model's and the reference's feature
  distributions (how far the student drifted from the teacher's outputs). FD from n samples is
  biased upward by about F²/n: compare models only at equal n, and read it as a drift measure,
  not as an image-quality FID;
* **to real images** (when a folder of real images is given, :func:`image_folder_features`): FD
  and kernel MMD² (:func:`~dmdr_fast.eval.metrics.mmd_rbf`, the CMMD recipe) between each model's
  features and the real images' — with CLIP features, FD_CLIP and CMMD. This is the
  image-quality comparison; it is not Inception FID (no Inception weights here), so its numbers
  are not comparable with published FIDs, only between models evaluated the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr_fast.eval.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    mean_pairwise_distance,
    mmd_rbf,
    pixel_features,
)

__all__ = [
    "Scorer",
    "clip_features",
    "compare_t2i",
    "format_comparison",
    "image_folder_features",
    "save_t2i_grid",
    "scorers_from_rewards",
]

#: ``(images (B, C, H, W) in [0, 1], prompts) -> (B,)`` scores, higher is better.
Scorer = Callable[[Tensor, list[str]], Tensor]


def _batched(
    fn: Callable[[Tensor, list[str]], Tensor], images: Tensor, prompts: list[str], bs: int
) -> Tensor:
    out = [
        fn(images[i : i + bs], prompts[i : i + bs]).detach().float().cpu() for i in range(0, len(prompts), bs)
    ]
    return torch.cat(out)


def _check(images: Mapping[str, Tensor], prompts: Sequence[str], per_prompt: int) -> int:
    if not images:
        raise ValueError("images must hold at least one model")
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    n = len(prompts) * per_prompt
    for name, x in images.items():
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != n:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"images[{name!r}] must be (len(prompts)·per_prompt = {n}, C, H, W) prompt-major, got {got}"
            )
    return n


@torch.no_grad()
def compare_t2i(
    images: Mapping[str, Tensor],
    prompts: Sequence[str],
    *,
    per_prompt: int = 1,
    scorers: Mapping[str, Scorer] | None = None,
    features: Callable[[Tensor], Tensor] | None = None,
    reference: str | None = None,
    batch_size: int = 16,
    feature_name: str = "given",
    real_features: Tensor | None = None,
) -> dict[str, Any]:
    """Score, compare and measure the diversity of several models' samples on the same prompts.

    Args:
        images: model name → ``(N·K, C, H, W)`` images in ``[0, 1]``, prompt-major (see the module
            docstring); every model on the same prompts and K.
        prompts: the N prompts.
        per_prompt: K, samples per prompt (diversity needs K >= 2).
        scorers: name → :data:`Scorer` (see :func:`scorers_from_rewards`).
        features: images → ``(B, F)`` features for the feature diversity and the FD (None: pixel
            features, 16×16 average-pooled).
        reference: the model the others are compared with (win rate, FD); default the first.
        batch_size: images per scorer / feature call.
        feature_name: what ``features`` are, for the table's note (e.g. "CLIP image").
        real_features: ``(M, F)`` features of real images made with the same ``features`` function
            (:func:`image_folder_features`); adds ``fd_to_real`` and ``mmd_to_real`` to every model.

    Returns:
        ``{"models": {name: {"score/<s>": mean, "score_se/<s>": standard error over prompts,
        "win_rate/<s>": vs the reference, "diversity_pixel": ..., "diversity_feat": ...,
        "fd_to_reference": ..., "fd_to_real": ..., "mmd_to_real": ...}}, "reference": name,
        "num_prompts": N, "per_prompt": K, "feature_dim": F, "num_real": M}``. Keys that do not apply (win rate and FD of the reference itself,
        diversity with K = 1, FD with fewer than 2 samples) are absent.
    """
    n = _check(images, prompts, per_prompt)
    scorers = dict(scorers or {})
    names = list(images)
    reference = names[0] if reference is None else reference
    if reference not in images:
        raise ValueError(f"reference {reference!r} is not one of the models {names}")
    expanded = [p for p in prompts for _ in range(per_prompt)]
    feat_fn = features if features is not None else pixel_features
    per_prompt_means: dict[str, dict[str, Tensor]] = {}
    feats: dict[str, Tensor] = {}
    models: dict[str, dict[str, float]] = {}
    for name in names:
        x = images[name]
        row: dict[str, float] = {}
        means: dict[str, Tensor] = {}
        for s, fn in scorers.items():
            scores = _batched(fn, x, expanded, batch_size).double()
            if scores.shape != (n,) or not bool(torch.isfinite(scores).all()):
                raise ValueError(f"scorer {s!r} must return {n} finite scores for model {name!r}")
            means[s] = scores.view(len(prompts), per_prompt).mean(dim=1)
            row[f"score/{s}"] = float(scores.mean())
            if len(prompts) > 1:
                row[f"score_se/{s}"] = float(means[s].std(unbiased=True) / math.sqrt(len(prompts)))
        feats[name] = torch.cat(
            [feat_fn(x[i : i + batch_size]).float().cpu() for i in range(0, n, batch_size)]
        )
        if per_prompt > 1:
            row["diversity_pixel"] = mean_pairwise_distance(pixel_features(x.float().cpu()), len(prompts))
            if features is not None:
                row["diversity_feat"] = mean_pairwise_distance(feats[name], len(prompts))
        per_prompt_means[name] = means
        models[name] = row
    for name in names:
        if name == reference:
            continue
        for s in scorers:
            a, b = per_prompt_means[name][s], per_prompt_means[reference][s]
            models[name][f"win_rate/{s}"] = float(((a > b).double() + 0.5 * (a == b).double()).mean())
        if n >= 2:
            models[name]["fd_to_reference"] = frechet_distance(
                feats[name].double(), feats[reference].double()
            )
    if real_features is not None:
        real = real_features.detach().double().cpu()
        if real.dim() != 2 or real.shape[1] != feats[reference].shape[1] or real.shape[0] < 2:
            raise ValueError(
                f"real_features must be (M >= 2, {feats[reference].shape[1]}) features made with the same "
                f"features function, got {tuple(real.shape)}"
            )
        real_stats = gaussian_stats(real)  # once for all models: M can be thousands × 1024
        for name in names:
            if n >= 2:
                models[name]["fd_to_real"] = frechet_distance_from_stats(
                    *gaussian_stats(feats[name].double()), *real_stats
                )
                models[name]["mmd_to_real"] = mmd_rbf(feats[name], real)
    return {
        "models": models,
        "reference": reference,
        "num_prompts": len(prompts),
        "per_prompt": per_prompt,
        "feature_dim": int(feats[reference].shape[1]),
        "features": feature_name if features is not None else "pixel",
        "num_real": int(real_features.shape[0]) if real_features is not None else 0,
    }


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_folder_features(
    folder: str | os.PathLike[str],
    features: Callable[[Tensor], Tensor] | None,
    *,
    size: tuple[int, int],
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Tensor:
    """Features of the real images in ``folder`` (sorted, the first ``limit``), in batches.

    Each image is converted to RGB, centre-cropped to the aspect ratio of ``size`` and resized to
    ``size`` (bicubic, antialiased), i.e. brought to the generated images' framing; only one batch
    is in memory at a time.

    Args:
        folder: A folder of .png/.jpg/.jpeg/.webp/.bmp files (not searched recursively).
        features: The same feature function the models are compared with (None: pixel features).
        size: ``(height, width)`` of the generated images.
        limit: Use at most this many images.
        batch_size: Images per feature call.
        progress: Show a progress bar.

    Returns:
        ``(M, F)`` float32 features on the CPU.

    Raises:
        ValueError: If the folder holds no such images.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if limit is not None:
        files = files[: max(int(limit), 0)]
    if not files:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}")
    height, width = size
    feat_fn = features if features is not None else pixel_features

    def load(path: Path) -> Tensor:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        w, h = rgb.size
        crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        box = (left, top, left + crop_w, top + crop_h)
        rgb = rgb.crop(box).resize((width, height), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)

    out = []
    for start in tqdm(range(0, len(files), batch_size), desc="real images", disable=not progress):
        batch = torch.stack([load(p) for p in files[start : start + batch_size]])
        out.append(feat_fn(batch.permute(0, 3, 1, 2).float() / 255.0).detach().float().cpu())
    return torch.cat(out)


def format_comparison(result: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`compare_t2i`'s result (one row per model) and how to read it."""
    models = result["models"]
    keys: list[str] = []
    for row in models.values():
        keys += [k for k in row if k not in keys and not k.startswith("score_se/")]
    header = "| model | " + " | ".join(keys) + " |"
    lines = [header, "|---|" + "---|" * len(keys)]
    for name, row in models.items():
        cells = []
        for k in keys:
            if k not in row:
                cells.append("—")
                continue
            se = row.get("score_se/" + k.removeprefix("score/")) if k.startswith("score/") else None
            cells.append(f"{row[k]:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n, k = result["num_prompts"], result["per_prompt"]
    lines += [
        "",
        f"{n} prompts × {k} samples; ± = standard error over prompts; win rate = fraction of prompts "
        f"where the model's mean score beats `{result['reference']}`'s; diversity = mean pairwise "
        f"distance of a prompt's samples; FD to reference in {result['features']} features "
        f"({result['feature_dim']}-dim, biased upward at small n: compare at equal n only).",
    ]
    if result.get("num_real"):
        lines.append(
            f"fd_to_real / mmd_to_real: FD and kernel MMD² ×1000 (RBF σ = 10 on normalised features, "
            f"unbiased) to {result['num_real']} real images in the same {result['features']} features — "
            f"image quality relative to real data; not Inception FID, compare only within this table's setup."
        )
    return "\n".join(lines)


def scorers_from_rewards(rewards: Any) -> dict[str, Scorer]:
    """Raw-score functions of a :class:`~dmdr_fast.rewards.CompositeReward` (or a list of rewards)."""
    if rewards is None:
        return {}
    items = list(getattr(rewards, "rewards", rewards))
    return {r.name: _scorer(r) for r in items}


def _scorer(reward: Any) -> Scorer:
    return lambda images, prompts: reward(images.to(_device(reward)), list(prompts))


def _device(module: Any) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def clip_features(rewards: Any) -> Callable[[Tensor], Tensor] | None:
    """The image embeddings of the first reward that has them (CLIP, PickScore), or None."""
    if rewards is None:
        return None
    for r in getattr(rewards, "rewards", rewards):
        if hasattr(r, "image_embeds"):
            return _image_embeds(r)
    return None


def _image_embeds(reward: Any) -> Callable[[Tensor], Tensor]:
    return lambda images: reward.image_embeds(images.to(_device(reward)))


def save_t2i_grid(
    images: Mapping[str, Tensor],
    prompts: Sequence[str],
    per_prompt: int,
    path: str | os.PathLike[str],
    *,
    cell: int = 192,
) -> Path:
    """One panel per model, one row per prompt (its K samples side by side), the prompt on the left.

    Images are resized to about ``cell`` pixels (antialiased down, integer-upscaled if tiny) so
    that a grid of 1024² samples stays a readable, small PNG.
    """
    import torch.nn.functional as F

    from dmdr_fast.eval.plots import save_comparison_grid

    def fit(x: Tensor) -> Tensor:
        x = x.float().cpu().clamp(0, 1)
        side = max(x.shape[-2:])
        if side > cell:
            size = (max(1, round(x.shape[-2] * cell / side)), max(1, round(x.shape[-1] * cell / side)))
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x

    side = max(max(x.shape[-2:]) for x in images.values())
    scale = max(1, cell // side) if side <= cell else 1
    labels = [p if len(p) <= 32 else p[:31] + "…" for p in prompts]
    return save_comparison_grid(
        {name: fit(x) for name, x in images.items()}, path, nrow=per_prompt, scale=scale, row_labels=labels
    )
