"""ImageReward (THUDM): a BLIP image-grounded text encoder + MLP head, on transformers' BLIP modules.

Upstream (``THUDM/ImageReward``, package ``image-reward`` 1.5, files ``ImageReward.pt`` and
``med_config.json`` on the hub repo ``THUDM/ImageReward``) scores a prompt/image pair as:

1. ``image_embeds = blip.visual_encoder(image)`` — BLIP's ViT-L/16 at 224 px (timm-style pre-LN
   blocks, LayerNorm eps 1e-6, exact GELU, fused ``qkv``), all ``(B, 1 + 196, 1024)`` tokens after
   the final norm;
2. ``blip.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)`` — BLIP's
   ``med.py`` BERT-base (12 layers, 768 wide, LayerNorm eps 1e-12) whose every layer cross-attends to
   the image tokens; bidirectional self-attention;
3. the ``[CLS]`` state ``last_hidden_state[:, 0]`` → ``mlp`` (``Linear(768,1024) → Dropout →
   Linear(1024,128) → Dropout → Linear(128,64) → Dropout → Linear(64,16) → Linear(16,1)``, no
   activations) → ``(r − 0.16717362830052426) / 1.0333394966054072``.

Text input: ``bert-base-uncased`` with BLIP's added ``[DEC]`` (bos, id 30522) and ``[ENC]`` (id 30523)
tokens, ``padding="max_length", truncation=True, max_length=35``. Upstream's ``score``,
``inference_rank`` and the differentiable ``score_gard`` used by its ReFL trainer all pass the
tokenizer's ids unchanged, so the first token is ``[CLS]``: unlike BLIP's ITM head they do **not**
overwrite ``input_ids[:, 0]`` with ``[ENC]``. This module reproduces that.

Design choice: the ``image-reward`` package pulls timm, fairscale, torchvision and a BLIP copy on
an old transformers API, so the model is rebuilt from transformers' ``BlipVisionModel`` and
``BlipTextModel`` (a port of the same ``med.py``; its cross-attention exists when
``config.is_decoder`` and is bypassed by ``is_decoder=False`` in the call, exactly like
``BlipForImageTextRetrieval``) plus :class:`ImageRewardHead`.

Key mapping (``ImageReward.pt`` → :class:`ImageRewardModel`; ``i`` the block index):

=================================================  ========================================================
``blip.visual_encoder.cls_token`` ``(1, 1, D)``      ``vision_model.embeddings.class_embedding``
``blip.visual_encoder.pos_embed`` ``(1, N+1, D)``    ``vision_model.embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.*``           ``vision_model.embeddings.patch_embedding.*``
``blip.visual_encoder.blocks.i.norm1/norm2.*``       ``vision_model.encoder.layers.i.layer_norm1/layer_norm2.*``
``blip.visual_encoder.blocks.i.attn.qkv.*``          ``vision_model.encoder.layers.i.self_attn.qkv.*``
``blip.visual_encoder.blocks.i.attn.proj.*``         ``vision_model.encoder.layers.i.self_attn.projection.*``
``blip.visual_encoder.blocks.i.mlp.fc1/fc2.*``       ``vision_model.encoder.layers.i.mlp.fc1/fc2.*``
``blip.visual_encoder.norm.*``                       ``vision_model.post_layernorm.*``
``blip.text_encoder.<rest>``                         ``text_encoder.<rest>`` (same names: HF ported med.py)
``mlp.layers.<n>.*``                                 ``mlp.layers.<n>.*``
=================================================  ========================================================

Dropped on load (unused by the score): ``blip.vision_proj.*``, ``blip.text_proj.*`` (contrastive
projections) and the ``blip.text_encoder.embeddings.position_ids`` buffer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmdr_fast._io import RESAVE_TENSORS, load_torch_file
from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.loading import MissingWeightsError, as_dtype, hub_file, optional_import, resolve_local
from dmdr_fast.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from dmdr_fast.rewards.spec import RewardSpec

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig

__all__ = [
    "BERT_TOKENIZER_SOURCE",
    "IMAGE_REWARD_EXTRA",
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_SOURCE",
    "IMAGE_REWARD_STD",
    "ImageReward",
    "ImageRewardHead",
    "ImageRewardModel",
    "blip_text_config_from_med_config",
    "blip_vision_config_from_state_dict",
    "build_image_reward",
    "image_reward_to_transformers_state_dict",
    "load_image_reward_tokenizer",
    "med_config_from_blip_text_config",
    "transformers_to_image_reward_state_dict",
]

#: The pip extra that provides this reward's dependencies (transformers), shared with the CLIP rewards.
IMAGE_REWARD_EXTRA = "rewards"
#: Hub repository of ``ImageReward.pt`` and ``med_config.json``.
IMAGE_REWARD_SOURCE = "THUDM/ImageReward"
#: Hub repository of the BERT tokenizer (``vocab.txt``) that BLIP extends with [DEC] and [ENC].
BERT_TOKENIZER_SOURCE = "google-bert/bert-base-uncased"
#: Upstream's reward normalisation: ``(r − mean) / std``.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072

_CHECKPOINT = "ImageReward.pt"
_MED_CONFIG = "med_config.json"
# BLIP's init_tokenizer adds these, in this order (ids 30522, 30523 after bert-base-uncased's vocabulary).
_BLIP_TOKENS = ("[DEC]", "[ENC]")

_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_IGNORED = re.compile(
    r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids"
)


def _transformers() -> Any:
    return optional_import("transformers", extra=IMAGE_REWARD_EXTRA, what="ImageReward")


class ImageRewardHead(nn.Module):
    """ImageReward's MLP: ``(B, input_size)`` → ``(B, 1)``; five linear layers with dropout and no activation.

    ``layers`` has upstream's ``nn.Sequential`` indices (linear layers at 0, 2, 4, 6, 7) so that the
    checkpoint keys ``mlp.layers.<n>.*`` load unchanged.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, input_size)`` → ``(B, 1)`` raw (unnormalised) reward."""
        return self.layers(x)

    @property
    def first_weight(self) -> Tensor:
        """The first linear layer's weight ``(1024, input_size)``: the head's device and dtype."""
        first = self.layers[0]
        assert isinstance(first, nn.Linear)  # built so in __init__
        return first.weight


class ImageRewardModel(nn.Module):
    """BLIP vision encoder + image-grounded BLIP text encoder + :class:`ImageRewardHead`.

    Args:
        vision_config: ``BlipVisionConfig`` (ViT-L/16: width 1024, 24 layers, 16 heads, 224 px,
            ``layer_norm_eps=1e-6``).
        text_config: ``BlipTextConfig`` with ``is_decoder=True`` (creates the cross-attention
            layers) and ``encoder_hidden_size`` = the vision width.
    """

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        tf = _transformers()
        if not text_config.is_decoder:
            raise ValueError("text_config.is_decoder must be True: it creates the cross-attention layers")
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(
                f"text_config.encoder_hidden_size ({text_config.encoder_hidden_size}) must equal the vision "
                f"width ({vision_config.hidden_size})"
            )
        self.vision_model = tf.BlipVisionModel(vision_config)
        self.text_encoder = tf.BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardHead(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw reward ``(B,)`` (before ``(r − mean)/std``), in the head's dtype.

        Args:
            pixel_values: ``(B, 3, S, S)`` normalised pixels.
            input_ids: ``(B, L)`` BERT ids, ``[CLS]`` first.
            attention_mask: ``(B, L)`` 1 for tokens, 0 for padding.
        """
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # bidirectional self-attention, as upstream's BertModel default
        ).last_hidden_state
        cls = text[:, 0]
        return self.mlp(cls.to(self.mlp.first_weight.dtype)).squeeze(-1)


def blip_vision_config_from_state_dict(
    sd: Mapping[str, Tensor], *, num_attention_heads: int | None = None
) -> BlipVisionConfig:
    """Infer the ``BlipVisionConfig`` of an ``ImageReward.pt`` state dict from its shapes.

    Args:
        sd: Upstream keys (``blip.visual_encoder.*``).
        num_attention_heads: Not visible in the shapes; ``width // 64`` (BLIP's ViT-B and ViT-L)
            when ``None``.
    """
    tf = _transformers()
    try:
        width, _, patch, _ = sd[_VISION + "patch_embed.proj.weight"].shape
        positions = sd[_VISION + "pos_embed"].shape[1]
        mlp = sd[_VISION + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not an ImageReward state dict: missing {exc.args[0]}") from None
    pattern = re.compile(re.escape(_VISION) + r"blocks\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := pattern.match(k)))
    grid = round((positions - 1) ** 0.5)
    heads = num_attention_heads or width // 64
    return tf.BlipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )


def blip_text_config_from_med_config(med_config: Mapping[str, Any], encoder_width: int) -> BlipTextConfig:
    """``BlipTextConfig`` of BLIP's ``med_config.json`` (a BERT config + ``add_cross_attention``).

    Args:
        med_config: The parsed ``med_config.json``.
        encoder_width: The vision width; BLIP overrides ``encoder_width`` with it.
    """
    tf = _transformers()
    return tf.BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config.get("max_position_embeddings", 512),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med_config.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med_config.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med_config.get("pad_token_id", 0),
        # Only used for decoding (never here); BlipTextConfig's defaults (30522, 102) would be out of
        # range for smaller vocabularies.
        bos_token_id=med_config.get("bos_token_id"),
        sep_token_id=med_config.get("sep_token_id"),
        is_decoder=True,
    )


def med_config_from_blip_text_config(config: BlipTextConfig) -> dict[str, Any]:
    """Inverse of :func:`blip_text_config_from_med_config`: the ``med_config.json`` dict upstream reads."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "pad_token_id": config.pad_token_id,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "encoder_width": config.encoder_hidden_size,
        "add_cross_attention": True,
    }


def image_reward_to_transformers_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert ``ImageReward.pt`` keys to :class:`ImageRewardModel` keys (see the module docstring).

    Raises:
        ValueError: Naming keys the mapping does not know (another BLIP variant), instead of
            dropping them silently as upstream's ``strict=False`` load would.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if _IGNORED.fullmatch(key):
            continue
        if key.startswith("mlp.layers."):
            out[key] = value
        elif key.startswith(_TEXT):
            out["text_encoder." + key[len(_TEXT) :]] = value
        elif key.startswith(_VISION):
            rest = key[len(_VISION) :]
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
            if rest in _VISION_TOP:
                out["vision_model." + _VISION_TOP[rest]] = value
            elif m and m.group(2) in _VISION_BLOCK:
                idx, sub, kind = m.groups()
                out[f"vision_model.encoder.layers.{idx}.{_VISION_BLOCK[sub]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward state dict has keys the BLIP mapping does not know: {unknown[:8]}")
    return out


def transformers_to_image_reward_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`image_reward_to_transformers_state_dict`: :class:`ImageRewardModel` → ``ImageReward.pt``.

    Adds the ``position_ids`` buffer upstream's ``med.py`` saves (``arange`` of the positions); the
    unused contrastive projections are not written (upstream loads with ``strict=False``).
    """
    top = {v: k for k, v in _VISION_TOP.items()}
    block = {v: k for k, v in _VISION_BLOCK.items()}
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.endswith("position_ids"):  # re-created below
            continue
        if key.startswith("mlp.layers."):
            out[key] = value
        elif key.startswith("text_encoder."):
            out[_TEXT + key[len("text_encoder.") :]] = value
        elif key.startswith("vision_model."):
            rest = key[len("vision_model.") :]
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
            if rest in top:
                out[_VISION + top[rest]] = value
            elif m and m.group(2) in block:
                idx, sub, kind = m.groups()
                out[f"{_VISION}blocks.{idx}.{block[sub]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"ImageRewardModel state dict has keys without an upstream counterpart: {unknown[:8]}"
        )
    positions = out.get(_TEXT + "embeddings.position_embeddings.weight")
    if positions is not None:
        out[_TEXT + "embeddings.position_ids"] = torch.arange(positions.shape[0]).unsqueeze(0)
    return out


def load_image_reward_tokenizer(where: str | os.PathLike[str]) -> Any:
    """BLIP's tokenizer: ``BertTokenizer`` (bert-base-uncased ``vocab.txt``) + ``[DEC]`` and ``[ENC]``.

    Args:
        where: Folder holding ``vocab.txt`` (or ``tokenizer.json``), or a hub id.

    Raises:
        MissingWeightsError: Naming :data:`BERT_TOKENIZER_SOURCE` when the files are missing.
    """
    tf = _transformers()
    p = Path(os.path.expanduser(os.fspath(where)))
    hint = (
        f"download the tokenizer of {BERT_TOKENIZER_SOURCE} (vocab.txt, tokenizer_config.json) on a machine "
        f"with internet, e.g. `huggingface-cli download {BERT_TOKENIZER_SOURCE} vocab.txt tokenizer_config.json "
        f"--local-dir {p}`"
    )
    is_hub_id = isinstance(where, str) and where.count("/") == 1 and not p.exists()
    if not is_hub_id and not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()):
        raise MissingWeightsError(f"ImageReward tokenizer: no vocab.txt in {p}; {hint}")
    try:
        tok = tf.BertTokenizer.from_pretrained(os.fspath(where))
    except OSError as exc:
        raise MissingWeightsError(f"ImageReward tokenizer: could not load {where} ({exc}); {hint}") from exc
    # Idempotent: a tokenizer saved after this call already has both tokens.
    tok.add_tokens(list(_BLIP_TOKENS), special_tokens=True)
    return tok


class ImageReward(Reward):
    """ImageReward score ``(mlp(BLIP_text(prompt | image)[CLS]) − mean) / std``, differentiable in the images.

    Images ``(B, 1|3, H, W)`` in ``[0, 1]`` are preprocessed on tensors like upstream (bicubic resize
    of the shorter side to 224, center crop, CLIP normalisation), so gradients reach them. The model
    is frozen in place and runs in its own dtype; the score is float32.

    Args:
        model: :class:`ImageRewardModel` (e.g. from :meth:`from_checkpoint`).
        tokenizer: BLIP's BERT tokenizer (:func:`load_image_reward_tokenizer`).
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (a hinge margin is in score
            units; the score is roughly standard-normal over prompts); ``None``:
            ``RewardSpec(name="image_reward")``.
        max_length: Token context; upstream uses 35.
        normalize: Apply upstream's ``(r − mean) / std`` (``False`` gives the raw head output).
        check_inputs: Validate images and prompts on every call.
    """

    default_name = "image_reward"

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        *,
        spec: RewardSpec | None = None,
        max_length: int = 35,
        normalize: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        self.model = model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.normalize = normalize
        self.image_size = int(model.vision_model.config.image_size)
        vocab = model.text_encoder.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab} embeddings"
            )
        self.train(False)

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, 1|3, H, W)`` in ``[0, 1]``; ``cond`` a sequence of B prompts."""
        batch = check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {tuple(images.shape)}")
        check_condition(cond, batch, kind="prompts")

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """BERT ids and attention mask ``(B, max_length)``, ``[CLS]`` first as upstream, on the model's device."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.model.mlp.first_weight.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 ImageReward of images ``(B, C, H, W)`` in ``[0, 1]`` and ``spec.prompt_prefix + cond``."""
        weight = self.model.mlp.first_weight
        pixels = clip_preprocess(images, self.image_size, mean=CLIP_MEAN, std=CLIP_STD, dtype=weight.dtype)
        ids, mask = self.tokenize(self.prompts(cond))
        reward = self.model(pixels.to(weight.device), ids, mask).float()
        return (reward - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD if self.normalize else reward

    def upstream_state_dict(self) -> dict[str, Tensor]:
        """The weights in ``ImageReward.pt`` keys, on CPU."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return transformers_to_image_reward_state_dict(sd)

    def save_checkpoint(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``ImageReward.pt`` (a flat state dict, as upstream) and ``med_config.json`` into ``folder``.

        The tokenizer is not part of the upstream files; save it with ``tokenizer.save_pretrained``.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.upstream_state_dict(), folder / _CHECKPOINT)
        med = med_config_from_blip_text_config(self.model.text_encoder.config)
        (folder / _MED_CONFIG).write_text(json.dumps(med, indent=2))
        return folder

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Tensor],
        med_config: str | os.PathLike[str] | Mapping[str, Any],
        tokenizer: Any,
        *,
        vision_num_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **reward_kwargs: Any,
    ) -> ImageReward:
        """Build from upstream files: ``ImageReward.pt``, ``med_config.json`` and the BERT tokenizer.

        Args:
            checkpoint: ``ImageReward.pt`` path, or its state dict already loaded.
            med_config: ``med_config.json`` path or its parsed dict.
            tokenizer: A tokenizer, or a folder / hub id for :func:`load_image_reward_tokenizer`.
            vision_num_heads: ViT heads (not visible in the weights; ``width // 64`` when ``None``).
            device, dtype: Where and in which precision to run the model.
            **reward_kwargs: :class:`ImageReward` arguments (``spec``, ``max_length``, ``normalize``, …).

        Raises:
            ImportError: transformers is missing (names the ``rewards`` extra).
            MissingWeightsError: The tokenizer files are missing.
            ValueError: Keys or shapes that do not match the BLIP layout.
        """
        _transformers()
        if isinstance(checkpoint, Mapping):
            sd = dict(checkpoint)
        else:
            sd = load_torch_file(checkpoint, map_location="cpu", convert=RESAVE_TENSORS)
        med: Mapping[str, Any] = (
            med_config if isinstance(med_config, Mapping) else json.loads(Path(med_config).read_text())
        )
        tok = (
            tokenizer
            if not isinstance(tokenizer, (str, os.PathLike))
            else load_image_reward_tokenizer(tokenizer)
        )
        vision_config = blip_vision_config_from_state_dict(sd, num_attention_heads=vision_num_heads)
        text_config = blip_text_config_from_med_config(med, vision_config.hidden_size)
        model = ImageRewardModel(vision_config, text_config)
        model.load_state_dict(image_reward_to_transformers_state_dict(sd), strict=True)
        reward = cls(model, tok, **reward_kwargs)
        return reward.to(device=device, dtype=as_dtype(dtype))


def build_image_reward(
    path: str | os.PathLike[str],
    *,
    spec: RewardSpec | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> ImageReward:
    """Registry builder: an :class:`ImageReward` from a local folder or the hub id ``THUDM/ImageReward``.

    Layout of a local folder: ``ImageReward.pt`` and ``med_config.json`` (from ``THUDM/ImageReward``)
    and the ``bert-base-uncased`` tokenizer (``vocab.txt``) either in ``<folder>/tokenizer/`` or in
    the folder itself.

    Args:
        path: Folder or hub id.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`; ``None``:
            ``RewardSpec(name="image_reward")``.
        device, dtype: Where and in which precision the model runs (dtype may be a name, ``"bfloat16"``).
        tokenizer: Tokenizer object, folder or hub id; found in the folder when ``None``.
        **kwargs: Further :meth:`ImageReward.from_checkpoint` arguments (``vision_num_heads``,
            ``max_length``, ``normalize``, ``check_inputs``).

    Raises:
        MissingWeightsError: Files not found, naming what to download.
        ImportError: transformers is missing (names the ``rewards`` extra).
    """
    _transformers()  # fail on the missing package before looking for files
    source = f"{IMAGE_REWARD_SOURCE} ({_CHECKPOINT}, {_MED_CONFIG})"
    where = resolve_local(path, what="ImageReward", source=source, expect=(_CHECKPOINT, _MED_CONFIG))
    if isinstance(where, str):  # hub id
        checkpoint, med = (
            hub_file(where, _CHECKPOINT, what="ImageReward", extra=IMAGE_REWARD_EXTRA),
            hub_file(where, _MED_CONFIG, what="ImageReward", extra=IMAGE_REWARD_EXTRA),
        )
        tokenizer = BERT_TOKENIZER_SOURCE if tokenizer is None else tokenizer
    else:
        if not where.is_dir():
            raise MissingWeightsError(
                f"ImageReward: {where} is a file; pass the folder holding {_CHECKPOINT} and {_MED_CONFIG} "
                f"(from {IMAGE_REWARD_SOURCE})"
            )
        checkpoint, med = where / _CHECKPOINT, where / _MED_CONFIG
        if tokenizer is None:
            tokenizer = where / "tokenizer" if (where / "tokenizer").is_dir() else where
    return ImageReward.from_checkpoint(
        checkpoint,
        med,
        tokenizer,
        device=device,
        dtype=dtype,
        spec=spec,
        **kwargs,
    )
