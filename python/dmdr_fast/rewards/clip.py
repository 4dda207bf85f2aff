"""CLIP-based text-image rewards: CLIP score and PickScore (differentiable in the images).

Both embed the decoded images with a frozen ``transformers`` :class:`~transformers.CLIPModel`
(preprocessing on tensors, :func:`~dmdr_fast.rewards.preprocess.clip_preprocess`, so gradients reach
the images) and compare them with the embedding of the (prefixed) prompt:

* :class:`CLIPScoreReward`: ``score = scale · cos(image, text)`` in ``[−scale, scale]``; the paper's
  text-to-image form is ``RewardSpec("clip", loss_form="hinge", margin=0.7)`` (``relu(0.7 − cos)``;
  docs/method.md §7, §11).
* :class:`PickScoreReward`: PickScore (a CLIP-H fine-tuned on human preferences), scored as its
  reference does, ``logit_scale.exp() · cos`` (≈ ``100 · cos``, typical values ~20), divided by
  ``scale`` when a unit range is wanted.

Prompts repeat across training steps, so text embeddings are cached per prompt string (LRU).
``transformers`` is imported lazily, in :meth:`CLIPScoreReward.from_pretrained` only; the classes
themselves accept any model with CLIP's ``get_image_features`` / ``get_text_features``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.loading import MissingWeightsError, optional_import, resolve_local
from dmdr_fast.rewards.preprocess import clip_preprocess
from dmdr_fast.rewards.spec import RewardSpec

__all__ = [
    "CLIP_HUB_ID",
    "PICKSCORE_HUB_ID",
    "PICKSCORE_PROCESSOR_HUB_ID",
    "CLIPScoreReward",
    "PickScoreReward",
    "clip_image_embeds",
    "freeze_model",
    "load_clip",
]

#: Default CLIP for :class:`CLIPScoreReward` and the aesthetic head (OpenAI CLIP ViT-L/14).
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
#: PickScore's weights (a ``CLIPModel``); its repository has no tokenizer.
PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
#: Where PickScore's reference takes its processor (tokenizer) from.
PICKSCORE_PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

#: A ``transformers`` ``CLIPModel`` or any module with its interface (``get_image_features``,
#: ``get_text_features``, ``config``), checked at run time by ``_check_clip_model``. Typed ``Any``:
#: transformers is imported lazily, and lookalike modules are accepted by design.
CLIPModelLike = Any

# Files from which the CLIP tokenizer can be loaded (any one is enough).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def freeze_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze a reward model in place: no parameter gradients, eval mode, optionally cast.

    Args:
        model: The reward's network.
        dtype: Cast its parameters (e.g. ``torch.bfloat16``); ``None`` keeps them.

    Returns:
        ``model`` itself.
    """
    if dtype is not None:
        model.to(dtype=dtype)
    return model.requires_grad_(False).eval()


def _param(model: nn.Module) -> Tensor:
    """A parameter of ``model``, for its device and dtype (works for any module with parameters)."""
    try:
        return next(model.parameters())
    except StopIteration as exc:
        raise ValueError(f"{type(model).__name__} has no parameters") from exc


def _pooled(out: Any) -> Tensor:
    """The projected embedding from ``get_{image,text}_features``.

    transformers < 5 returns the ``(B, D)`` tensor; 5.x returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` is the projected embedding.
    """
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if not isinstance(pooled, Tensor):
        raise TypeError(f"expected CLIP features or an output with pooler_output, got {type(out).__name__}")
    return pooled


def _check_clip_model(model: Any) -> None:
    for attr in ("get_image_features", "get_text_features", "config"):
        if not hasattr(model, attr):
            raise TypeError(
                f"model must be a CLIP model (CLIPModel-like, with .{attr}), got {type(model).__name__}"
            )


def clip_image_embeds(model: CLIPModelLike, images: Tensor, *, image_size: int, crop: bool = True) -> Tensor:
    """L2-normalised CLIP image embeddings, differentiable in ``images``.

    Args:
        model: A CLIP model (``get_image_features``), on the device of ``images``.
        images: ``(B, 1|3, H, W)`` in ``[0, 1]``.
        image_size: The model's input resolution (``config.vision_config.image_size``).
        crop: Resize the shorter side + center-crop (CLIP's processor) or resize to a square.

    Returns:
        ``(B, D)`` float32 unit vectors (D = the model's projection dim).
    """
    pixels = clip_preprocess(images, image_size, crop=crop, dtype=_param(model).dtype)
    feats = _pooled(model.get_image_features(pixel_values=pixels)).float()
    return F.normalize(feats, dim=-1)


def load_clip(
    path: str | os.PathLike[str],
    *,
    what: str,
    source: str,
    tokenizer_path: str | os.PathLike[str] | None = None,
    tokenizer_source: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a ``transformers`` CLIPModel (float32, frozen) and its tokenizer from a folder or hub id.

    Args:
        path: Local folder in the ``save_pretrained`` format (``config.json`` + weights) or a hub id.
        what: Model name for errors (``"PickScore"``).
        source: Where the weights are published, for errors.
        tokenizer_path: Folder/hub id of the tokenizer; ``None`` uses ``path``.
        tokenizer_source: Where the tokenizer is published, for errors; ``None`` uses ``source``.
        with_tokenizer: ``False`` skips the tokenizer (image-only rewards) and returns ``None`` for it.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        MissingWeightsError: The weights or the tokenizer are not found locally (message says what
            to download and where to put it).
        ImportError: ``transformers`` is not installed (names the pip extra).
    """
    transformers = optional_import("transformers", extra="rewards", what=what)
    where = resolve_local(path, what=what, source=source, expect=("config.json",))
    tokenizer = None
    if with_tokenizer:
        tok_source = tokenizer_source or source
        tok_where = (
            where
            if tokenizer_path is None
            else resolve_local(tokenizer_path, what=f"{what} tokenizer", source=tok_source)
        )
        if isinstance(tok_where, Path) and not (
            tok_where.is_dir() and any((tok_where / f).exists() for f in _TOKENIZER_FILES)
        ):
            raise MissingWeightsError(
                f"{what}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tok_where}. Pass "
                f"tokenizer_path= a local copy of {tok_source} (e.g. `huggingface-cli download {tok_source} "
                f"--local-dir DIR` on a machine with internet)"
            )
        # The CLIP tokenizer class, not AutoTokenizer: a bare vocab.json + merges.txt (no
        # tokenizer_config.json) does not say which tokenizer it is. transformers < 5 calls the
        # tokenizers-backed class CLIPTokenizerFast; 5.x has only CLIPTokenizer (tokenizers-backed).
        tokenizer_cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
        tokenizer = tokenizer_cls.from_pretrained(str(tok_where))
    # Loaded in float32 and cast afterwards: the dtype keyword of from_pretrained changed name
    # (torch_dtype → dtype) across the transformers versions we support.
    model = transformers.CLIPModel.from_pretrained(str(where))
    return freeze_model(model), tokenizer


class CLIPScoreReward(Reward):
    """Text-image alignment: ``score = scale · cos(CLIP_image(x), CLIP_text(prefix + prompt))``.

    The CLIP model is frozen in place (``requires_grad_(False)``, eval mode, optionally cast to
    ``dtype``); gradients flow to the images through tensor preprocessing. Scores are float32
    whatever the model's dtype. Text embeddings (no gradient) are cached per prompt string in an
    LRU of ``text_cache_size`` entries; the cache is cleared when the reward is moved or cast.

    Args:
        model: A ``transformers`` ``CLIPModel`` (or any module with its ``get_image_features``,
            ``get_text_features`` and ``config.vision_config.image_size``).
        tokenizer: Its tokenizer (callable as ``tokenizer(list[str], padding=..., return_tensors="pt")``).
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (paper: ``loss_form="hinge"``,
            ``margin=0.7``); ``None``: ``RewardSpec(name="clip")``.
        scale: Multiplier of the cosine similarity.
        dtype: Cast the model (e.g. ``torch.bfloat16``); ``None`` keeps it.
        crop: CLIP's resize-shorter-side + center-crop (``True``) or a plain resize to a square.
        text_cache_size: Number of prompt embeddings kept; 0 disables the cache.
        check_inputs: Validate images and prompts on every call (one host sync).

    Attributes:
        cache_hits: Distinct prompts per call found in the text cache (cumulative).
        cache_misses: Distinct prompts per call that had to be encoded (cumulative).
    """

    model: CLIPModelLike

    #: Human name and default download source, used in errors of :meth:`from_pretrained`.
    _what = "CLIP"
    _default_source = CLIP_HUB_ID
    _default_tokenizer_source: str | None = None  # None: the model's own repository
    default_name = "clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        spec: RewardSpec | None = None,
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        crop: bool = True,
        text_cache_size: int = 1024,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        _check_clip_model(model)
        if not callable(tokenizer):
            raise TypeError(
                f"tokenizer must be callable (a transformers tokenizer), got {type(tokenizer).__name__}"
            )
        if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
        if not isinstance(text_cache_size, int) or text_cache_size < 0:
            raise ValueError(f"text_cache_size must be a non-negative int, got {text_cache_size!r}")
        self.model = freeze_model(model, dtype)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.crop = crop
        config = self.model.config
        self.image_size = int(config.vision_config.image_size)
        self.max_length = int(config.text_config.max_position_embeddings)
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **reward_kwargs: Any,
    ) -> CLIPScoreReward:
        """Build the reward from a local ``save_pretrained`` folder or (online) a hub id.

        Args:
            path_or_id: Folder with ``config.json`` + weights (+ tokenizer files), or a hub id.
            tokenizer_path: Tokenizer folder/hub id if not stored with the model.
            device: Move the model there.
            dtype: Cast the model (scores stay float32).
            **reward_kwargs: Passed to the constructor (``spec``, ``scale``, ``crop``, ...).

        Raises:
            MissingWeightsError: Weights or tokenizer not found (says what to download).
            ImportError: ``transformers`` missing (names the ``rewards`` extra).
        """
        is_hub_id = _looks_like_hub_id(path_or_id)
        source = str(path_or_id) if is_hub_id else cls._default_source
        if tokenizer_path is None and is_hub_id and cls._default_tokenizer_source is not None:
            # e.g. PickScore's repository holds no tokenizer: take the one its reference uses.
            tokenizer_path = cls._default_tokenizer_source
        model, tokenizer = load_clip(
            path_or_id,
            what=cls._what,
            source=source,
            tokenizer_path=tokenizer_path,
            tokenizer_source=cls._default_tokenizer_source,
        )
        reward = cls(model, tokenizer, dtype=dtype, **reward_kwargs)
        return reward if device is None else reward.to(device)

    # -- scoring ---------------------------------------------------------------------------------

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, 1|3, H, W)`` in ``[0, 1]`` and B prompt strings."""
        batch = check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {tuple(images.shape)}")
        check_condition(cond, batch, kind="prompts")

    def _apply(self, fn, recurse=True):
        # .to(device)/.half() etc. go through _apply: cached embeddings would be on the old device.
        self._text_cache.clear()
        return super()._apply(fn, recurse)

    def clear_text_cache(self) -> None:
        """Drop all cached prompt embeddings."""
        self._text_cache.clear()

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> Tensor:
        """``(N, D)`` float32 unit text embeddings of ``texts`` (one tokenizer + model call)."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = _param(self.model).device
        feats = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return F.normalize(_pooled(feats).float(), dim=-1)

    def text_embeds(self, texts: list[str]) -> Tensor:
        """L2-normalised text embeddings ``(N, D)`` float32 (no gradient), through the LRU cache.

        Args:
            texts: N prompts, already prefixed (see :meth:`~Reward.prompts`).
        """
        if self.text_cache_size == 0:
            return self._encode_texts(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        self.cache_misses += len(missing)
        self.cache_hits += len(set(texts)) - len(missing)
        if missing:
            for text, emb in zip(missing, self._encode_texts(missing)):
                self._text_cache[text] = emb
        out = []
        for t in texts:
            self._text_cache.move_to_end(t)
            out.append(self._text_cache[t])
        # Evict only after gathering, so a batch larger than the cache still gets all its embeddings.
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack(out)

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``(B, D)`` float32, differentiable in ``images`` ``(B, C, H, W)``."""
        return clip_image_embeds(self.model, images, image_size=self.image_size, crop=self.crop)

    def cosine(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` cosine similarity in ``[−1, 1]`` of each image with its (prefixed) prompt."""
        img = self.image_embeds(images)
        txt = self.text_embeds(self.prompts(cond)).to(img.device)
        return (img * txt).sum(dim=-1)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 ``scale · cos`` for images ``(B, C, H, W)`` in ``[0, 1]`` and B prompts."""
        return self.scale * self.cosine(images, cond)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, image_size={self.image_size}"


class PickScoreReward(CLIPScoreReward):
    """PickScore: ``score = logit_scale.exp() · cos(image, text) / scale`` (the reference's score at ``scale=1``).

    PickScore is a ``CLIPModel`` (CLIP-H/14 fine-tuned on Pick-a-Pic preferences) published as
    :data:`PICKSCORE_HUB_ID`; its tokenizer comes from :data:`PICKSCORE_PROCESSOR_HUB_ID`. With the
    published ``logit_scale`` (exp ≈ 100) scores are ~20 for typical images; ``scale=100`` brings
    them back to cosine units (so a hinge margin is comparable with CLIP's). Note that ``scale``
    *divides* here and multiplies in :class:`CLIPScoreReward`: in both cases it sets the unit.

    Args:
        model: The PickScore ``CLIPModel``.
        tokenizer: The CLIP-H tokenizer.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`; ``None``:
            ``RewardSpec(name="pickscore")``.
        scale: Divisor of the score.
        **kwargs: As :class:`CLIPScoreReward` (``dtype``, ``crop``, ``text_cache_size``,
            ``check_inputs``).
    """

    _what = "PickScore"
    _default_source = PICKSCORE_HUB_ID
    _default_tokenizer_source = PICKSCORE_PROCESSOR_HUB_ID
    default_name = "pickscore"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        spec: RewardSpec | None = None,
        scale: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(model, tokenizer, spec=spec, scale=scale, **kwargs)
        if not isinstance(getattr(model, "logit_scale", None), Tensor):
            raise TypeError("PickScore needs a CLIP model with a logit_scale parameter")

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 ``logit_scale.exp() · cos / scale``."""
        logit_scale = self.model.logit_scale.detach().float().exp()
        return logit_scale * self.cosine(images, cond) / self.scale


def _looks_like_hub_id(path: str | os.PathLike[str]) -> bool:
    """A string ``owner/name`` that is not an existing local path (mirrors :func:`resolve_local`)."""
    text = str(path)
    if not isinstance(path, str) or Path(os.path.expanduser(text)).exists():
        return False
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))
