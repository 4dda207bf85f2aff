"""Random-weight diffusers pipelines assembled from configs: for tests, CPU smoke runs and GPU benchmarks.

Nothing is downloaded: tokenizers are byte-level BPE vocabularies written on the fly, every model is
built from a config with seeded random weights (each family's ``random_pipeline``, registered in
:mod:`dmdr_fast.models.families`; the parts in :mod:`dmdr_fast.models.random_parts`). Sizes:

- ``tiny``: a few thousand parameters per component, 16×16-pixel images — the round-trip tests and
  the CPU smoke runs of ``dmdr-fast train`` / ``bench`` use it;
- ``sd35-medium`` (SD3 only): the SD3.5-Medium transformer (24 layers, 24 heads × 64, dual attention
  in the first 13 layers, 2.2B parameters) and the SD3 VAE at their real sizes, with tiny text
  encoders (CLIP outputs are padded to the transformer's width; a one-layer 4096-wide T5): what a DMDR step costs on a GPU
  does not depend on the weights, and with the prompt cache the text encoders are not in the step.

Some builders take options (keyword-only, with defaults that give the pipelines above):
:func:`random_options` lists them, e.g. SD3's ``t5=False`` (no T5 encoder) and Flux's
``guidance_embeds=False`` (a Flux-schnell-like transformer). The adapter tests build their
pipelines here too, so the tests and ``make-pipeline`` share one source of tiny models.

``dmdr-fast make-pipeline --family sd3 --size tiny --out DIR`` writes one to a folder.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from dmdr_fast.models.families import T2I_FAMILIES, get_family
from dmdr_fast.models.random_parts import byte_level_clip_tokenizer, char_t5_tokenizer, qwen_chat_tokenizer

__all__ = [
    "build_random_pipeline",
    "byte_level_clip_tokenizer",
    "char_t5_tokenizer",
    "qwen_chat_tokenizer",
    "random_options",
    "random_sizes",
    "save_random_pipeline",
]


def random_sizes() -> dict[str, tuple[str, ...]]:
    """The sizes of random pipeline each family builds (its registry entry's ``random_sizes``)."""
    return {name: get_family(name).random_sizes for name in T2I_FAMILIES}


def random_options(family: str) -> dict[str, Any]:
    """The options ``family``'s builder takes (its keyword-only arguments) and their defaults."""
    builder = get_family(family).random_pipeline
    return {
        name: param.default
        for name, param in inspect.signature(builder).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_random_pipeline(
    family: str, size: str, folder: str | os.PathLike[str], *, seed: int = 0, **options: Any
) -> Any:
    """A random-weight pipeline of ``family`` and ``size`` (scratch files go under ``folder``).

    Args:
        **options: The family builder's options (:func:`random_options`); the defaults give the
            pipelines ``make-pipeline`` writes.

    Raises:
        ValueError: For an unknown family or size, or an option the family's builder does not take.
    """
    if family not in T2I_FAMILIES:
        raise ValueError(
            f"no random pipeline builder for family {family!r}; families: {sorted(T2I_FAMILIES)}"
        )
    spec = get_family(family)
    if size not in spec.random_sizes:
        raise ValueError(f"family {family!r} has sizes {list(spec.random_sizes)}, got {size!r}")
    accepted = random_options(family)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"the random {family!r} pipeline has no option(s) {unknown}; its options: "
            f"{sorted(accepted) or 'none'}"
        )
    return spec.random_pipeline(size, Path(folder), seed, **options)


def save_random_pipeline(
    family: str,
    size: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Path:
    """Build a random pipeline and ``save_pretrained`` it to ``out_dir``; returns the folder.

    Args:
        dtype: Weights dtype of the saved files (default fp32; bf16 halves a real-size folder).
        **options: The family builder's options (see :func:`build_random_pipeline`).
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_random_pipeline(family, size, out, seed=seed, **options)
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(str(out))
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out
