"""Building blocks of random-weight pipelines: offline tokenizers, tiny text encoders, tiny VAEs.

Nothing is downloaded: tokenizers are byte-level vocabularies written on the fly, models are built
from configs with seeded random weights. Each family's module assembles its own pipeline from these
(``random_pipeline``, registered in its :data:`FAMILY`); :mod:`dmdr_fast.pipelines.random` builds
and saves them by family name, for the tests, CPU smoke runs and GPU benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "byte_level_clip_tokenizer",
    "char_t5_tokenizer",
    "clip_text_model",
    "qwen_chat_tokenizer",
    "t5_encoder",
    "tiny_autoencoder",
    "tiny_vae",
]

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def byte_level_clip_tokenizer(folder: str | os.PathLike[str], max_length: int) -> Any:
    """A CLIP tokenizer over the 256 byte symbols (no merges), written to ``folder``.

    Every prompt tokenizes (one token per byte), which is all random text encoders need.
    """
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def char_t5_tokenizer() -> Any:
    """A character-level T5 (Unigram) tokenizer: pad/eos/unk, letters, digits and ``▁letter``."""
    import string

    import transformers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    # transformers 5 resolves the *TokenizerFast names at runtime only (aliases of the new classes).
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)  # type: ignore[attr-defined]


def qwen_chat_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer (3 special tokens + 256 byte symbols) with a Qwen3 chat template."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*special, *sorted(ByteLevel.alphabet())])}
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=special[1:])
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def t5_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    """A one-layer T5 encoder of ``width`` over ``tokenizer``'s vocabulary."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=4, d_ff=16, num_layers=1, num_heads=2
    )
    return transformers.T5EncoderModel(config).eval()


def tiny_vae(seed: int, scaling: float, shift: float | None) -> Any:
    """A two-block 4-channel AutoencoderKL for 16×16 images with the family's latent scaling/shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling,
        shift_factor=shift,
    ).eval()


def tiny_autoencoder(seed: int, scaling: float, shift: float) -> Any:
    """A two-block 4-channel ``AutoencoderTiny`` (a TAESD-like decoder) matching :func:`tiny_vae`'s
    latents: VAE factor 2, the family's latent scaling/shift (for ``model.tiny_vae``)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
        scaling_factor=scaling,
        shift_factor=shift,
    ).eval()


def clip_text_model(
    tokenizer: Any, *, hidden: int, projection: int, tokens: int, seed: int, cls: Any = None
) -> Any:
    """A 2-layer CLIP text model (``cls``: default ``CLIPTextModelWithProjection``)."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (cls or transformers.CLIPTextModelWithProjection)(config).eval()
