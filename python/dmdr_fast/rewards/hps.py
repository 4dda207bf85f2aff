"""HPSv2 / HPSv2.1 reward: cosine similarity of a preference-tuned open_clip ViT-H-14, on transformers' CLIPModel.

Upstream (``tgxs002/HPSv2``) fine-tunes the *full* state dict of open_clip's ViT-H-14
(``laion2B-s32B-b79K``) and ships it as ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` on the
hub repo ``xswu/HPSv2``: a ``torch.save`` dict whose ``"state_dict"`` holds open_clip keys. The score
is ``cos(image_emb, text_emb)`` (papers report it ×100; the DMDR paper trains on the hinge
``relu(0.7 − cos)`` of the prompt prefixed with ``"Realistic photo "``).

Design choice: the model runs on ``transformers.CLIPModel``, not on open_clip. open_clip imports
torchvision at import time (``open_clip/utils.py`` → ``torchvision.ops``), which adds a heavy
dependency with a fragile torch-version pin; the ViT-H-14 architecture is exactly expressible as a
CLIPModel (pre-LN blocks, exact GELU, LayerNorm eps 1e-5, class-token pooling, EOT pooling), so
:func:`open_clip_to_transformers_state_dict` converts the upstream keys once at load time and
:func:`transformers_to_open_clip_state_dict` writes them back (``HPSReward.save_checkpoint``).

Key mapping (open_clip → CLIPModel; ``i`` the block index):

==========================================================  ==================================================
``visual.conv1.weight``                                      ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                                   ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                              ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*`` / ``visual.ln_post.*``                   ``vision_model.pre_layrnorm.*`` / ``.post_layernorm.*``
``visual.transformer.resblocks.i.*``                         ``vision_model.encoder.layers.i.*``
``visual.proj`` ``(width, embed)``                           ``visual_projection.weight`` ``(embed, width)`` (ᵀ)
``token_embedding.weight``                                   ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                                     ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.i.*``                                ``text_model.encoder.layers.i.*``
``ln_final.*``                                               ``text_model.final_layer_norm.*``
``text_projection`` ``(width, embed)``                       ``text_projection.weight`` ``(embed, width)`` (ᵀ)
``logit_scale``                                              ``logit_scale``
==========================================================  ==================================================

Inside a block: ``ln_1``/``ln_2`` → ``layer_norm1``/``layer_norm2``, ``attn.in_proj_{weight,bias}``
``(3·width, …)`` → ``self_attn.{q,k,v}_proj.{weight,bias}`` (split in q, k, v order, as
``nn.MultiheadAttention`` packs them), ``attn.out_proj`` → ``self_attn.out_proj``, ``mlp.c_fc`` /
``mlp.c_proj`` → ``mlp.fc1`` / ``mlp.fc2``.

Tokenizer: open_clip's ViT-H-14 uses the OpenAI CLIP BPE with a context of 77 tokens; here it is a
local ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``) from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Text is causal and pooled at the first end-of-text token,
so padding after it never changes the embedding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dmdr_fast._io import RESAVE_TENSORS, load_torch_file
from dmdr_fast.rewards.base import Reward, RewardCondition, check_condition, check_images
from dmdr_fast.rewards.loading import MissingWeightsError, as_dtype, hub_file, optional_import, resolve_local
from dmdr_fast.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from dmdr_fast.rewards.spec import RewardSpec

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

__all__ = [
    "HPS_CHECKPOINTS",
    "HPS_EXTRA",
    "HPS_SOURCE",
    "HPS_TOKENIZER_SOURCE",
    "HPSReward",
    "build_hps",
    "clip_config_from_open_clip_state_dict",
    "load_open_clip_state_dict",
    "open_clip_to_transformers_state_dict",
    "transformers_to_open_clip_state_dict",
    "vit_h_14_config",
]

#: The pip extra that provides this reward's dependencies (transformers), shared with the CLIP rewards.
HPS_EXTRA = "rewards"
#: Hub repository of the HPS checkpoints.
HPS_SOURCE = "xswu/HPSv2"
#: Hub repository whose CLIP tokenizer files (vocab.json, merges.txt) ViT-H-14 uses.
HPS_TOKENIZER_SOURCE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: Version → checkpoint file name in :data:`HPS_SOURCE`.
HPS_CHECKPOINTS: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

_TOKENIZER_FILES = ("vocab.json", "merges.txt")

# open_clip → CLIPModel renames outside the transformer blocks; the projections are transposed separately.
_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_PREFIXES = {
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "transformer.resblocks.": "text_model.encoder.layers.",
}
_IN_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
# Buffers some open_clip versions save (the causal mask); not parameters.
_IGNORED = ("attn_mask",)


def _transformers() -> Any:
    return optional_import("transformers", extra=HPS_EXTRA, what="HPSReward")


def vit_h_14_config() -> CLIPConfig:
    """The ``transformers.CLIPConfig`` of open_clip's ViT-H-14 (the HPS backbone).

    Sizes from open_clip's ``ViT-H-14.json``: embed 1024; vision width 1280, 32 layers, head width
    80 (16 heads), patch 14 at 224 px; text width 1024, 24 layers, 16 heads, context 77, vocabulary
    49408 (end-of-text 49407, start-of-text 49406). Activations are exact GELU (not QuickGELU).
    """
    tf = _transformers()
    return tf.CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
            projection_dim=1024,
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=1024,
        ),
        projection_dim=1024,
    )


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def clip_config_from_open_clip_state_dict(
    sd: Mapping[str, Tensor], *, vision_head_width: int = 80, text_head_width: int = 64
) -> CLIPConfig:
    """Infer the ``CLIPConfig`` of an open_clip ViT state dict from its tensor shapes.

    Head counts are not visible in the shapes: they are ``width // head_width`` (ViT-H-14: vision
    head width 80, text head width 64 — the defaults). The vocabulary is assumed to end with the
    OpenAI BPE's ``<|startoftext|>``, ``<|endoftext|>`` (ids ``V−2``, ``V−1``).

    Args:
        sd: open_clip keys (``visual.conv1.weight``, ``token_embedding.weight``, …).
        vision_head_width, text_head_width: Per-head widths of the two towers.

    Raises:
        ValueError: If the state dict is not an open_clip ViT-CLIP or a width is not divisible.
    """
    tf = _transformers()
    sd = _strip_module_prefix(sd)
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not an open_clip ViT state dict: missing {missing}")
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, t_width = sd["token_embedding.weight"].shape
    if v_width % vision_head_width or t_width % text_head_width:
        raise ValueError(
            f"widths (vision {v_width}, text {t_width}) are not multiples of the head widths "
            f"({vision_head_width}, {text_head_width})"
        )
    embed = sd["visual.proj"].shape[1]
    return tf.CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=t_width,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_blocks(sd, "transformer.resblocks."),
            num_attention_heads=t_width // text_head_width,
            max_position_embeddings=sd["positional_embedding"].shape[0],
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=0,
            projection_dim=embed,
        ),
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_blocks(sd, "visual.transformer.resblocks."),
            num_attention_heads=v_width // vision_head_width,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=embed,
        ),
        projection_dim=embed,
    )


def _strip_module_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # DDP-saved checkpoints prefix every key with "module."
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def open_clip_to_transformers_state_dict(
    sd: Mapping[str, Tensor], config: CLIPConfig | None = None
) -> dict[str, Tensor]:
    """Convert an open_clip ViT-CLIP state dict (HPS checkpoint layout) to ``CLIPModel`` keys.

    Args:
        sd: open_clip keys (a ``"module."`` prefix is stripped); see the module docstring.
        config: If given, the block counts are checked against it.

    Returns:
        ``CLIPModel`` state dict; ``q/k/v_proj`` are views of ``in_proj`` split in three along dim 0,
        the projections are transposed copies ``(embed, width)``.

    Raises:
        ValueError: Naming keys the mapping does not know (e.g. layer-scale or attention-pool
            weights of another open_clip architecture) — they would otherwise be silently dropped.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in _strip_module_prefix(sd).items():
        if key in _IGNORED:
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        if key in _PROJECTIONS:
            # open_clip applies ``x @ proj`` with proj (width, embed); nn.Linear stores (embed, width).
            out[_PROJECTIONS[key]] = value.t().contiguous()
            continue
        for src, dst in _BLOCK_PREFIXES.items():
            if key.startswith(src):
                idx, _, rest = key[len(src) :].partition(".")
                base = f"{dst}{idx}."
                if rest in _IN_BLOCK:
                    out[base + _IN_BLOCK[rest]] = value
                elif rest in _IN_PROJ:
                    q, k, v = value.chunk(3, dim=0)
                    suffix = _IN_PROJ[rest]
                    for name, part in zip(("q", "k", "v"), (q, k, v), strict=True):
                        out[f"{base}self_attn.{name}_proj.{suffix}"] = part
                else:
                    unknown.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip state dict has keys the ViT-CLIP mapping does not know: {unknown[:8]}")
    if config is not None:
        for tower, prefix in (
            ("vision", "vision_model.encoder.layers."),
            ("text", "text_model.encoder.layers."),
        ):
            want = getattr(config, f"{tower}_config").num_hidden_layers
            got = _count_blocks(out, prefix)
            if got != want:
                raise ValueError(f"checkpoint has {got} {tower} blocks but the config has {want}")
    return out


def transformers_to_open_clip_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`open_clip_to_transformers_state_dict`: ``CLIPModel`` keys → open_clip keys.

    Args:
        sd: A ``CLIPModel`` state dict.

    Returns:
        open_clip state dict (the ``"state_dict"`` of an HPS checkpoint); ``in_proj`` is the
        concatenation of q, k, v along dim 0 and the projections are ``(width, embed)``.

    Raises:
        ValueError: Naming ``CLIPModel`` keys without an open_clip counterpart.
    """
    top = {v: k for k, v in _TOP_LEVEL.items()}
    proj = {v: k for k, v in _PROJECTIONS.items()}
    in_block = {v: k for k, v in _IN_BLOCK.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.endswith("position_ids"):  # non-persistent in recent transformers, saved by old versions
            continue
        if key in top:
            out[top[key]] = value
            continue
        if key in proj:
            out[proj[key]] = value.t().contiguous()
            continue
        for src, dst in _BLOCK_PREFIXES.items():
            if key.startswith(dst):
                idx, _, rest = key[len(dst) :].partition(".")
                base = f"{src}{idx}."
                m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
                if rest in in_block:
                    out[base + in_block[rest]] = value
                elif m:
                    qkv.setdefault(f"{base}attn.in_proj_{m.group(2)}", {})[m.group(1)] = value
                else:
                    unknown.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"CLIPModel state dict has keys without an open_clip counterpart: {unknown[:8]}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_open_clip_state_dict(checkpoint: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read an HPS checkpoint file: ``torch.load(...)["state_dict"]`` (or a bare state dict).

    Loaded with ``weights_only=True`` on CPU; a ``"module."`` prefix is stripped.
    """
    obj = load_torch_file(checkpoint, map_location="cpu", convert=RESAVE_TENSORS)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{checkpoint}: expected a state dict or a dict with 'state_dict', got {type(obj)}")
    return _strip_module_prefix(obj)


def _load_clip_tokenizer(where: str | os.PathLike[str]) -> Any:
    tf = _transformers()
    hint = (
        f"download the tokenizer files {list(_TOKENIZER_FILES)} (and tokenizer_config.json, "
        f"special_tokens_map.json) of {HPS_TOKENIZER_SOURCE} on a machine with internet, e.g. "
        f"`huggingface-cli download {HPS_TOKENIZER_SOURCE} vocab.json merges.txt tokenizer_config.json "
        f"special_tokens_map.json --local-dir {where}`"
    )
    p = Path(os.path.expanduser(os.fspath(where)))
    if p.is_dir():
        # The hub folder has both forms; ``save_pretrained`` of transformers 5 writes only tokenizer.json.
        missing = [f for f in _TOKENIZER_FILES if not (p / f).exists()]
        if missing and not (p / "tokenizer.json").exists():
            raise MissingWeightsError(f"HPS tokenizer: {p} lacks {missing} (or tokenizer.json); {hint}")
    elif not (isinstance(where, str) and where.count("/") == 1 and not p.exists()):
        raise MissingWeightsError(f"HPS tokenizer: no tokenizer folder at {p}; {hint}")
    try:
        return tf.CLIPTokenizer.from_pretrained(os.fspath(where))
    except OSError as exc:  # hub id that cannot be fetched (offline)
        raise MissingWeightsError(f"HPS tokenizer: could not load {where} ({exc}); {hint}") from exc


class HPSReward(Reward):
    """Human Preference Score v2 / v2.1: ``score = scale · cos(image_emb, text_emb)``, differentiable in the images.

    Images ``(B, 1|3, H, W)`` in ``[0, 1]`` are preprocessed on tensors like open_clip's eval
    transform (bicubic resize of the shorter side to the model resolution, center crop, OpenAI CLIP
    normalisation), so gradients reach them. The text side carries no gradient. Features are
    normalised and compared in float32; the model runs in its own dtype. The model is frozen in
    place.

    Args:
        model: A ``transformers.CLIPModel`` (e.g. from :meth:`from_checkpoint`).
        tokenizer: The matching CLIP tokenizer (a transformers tokenizer called on a list of strings).
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec` (the paper:
            ``loss_form="hinge"``, ``margin=0.7``, ``prompt_prefix="Realistic photo "``;
            docs/method.md §11); ``None``: ``RewardSpec(name="hps")``.
        scale: Multiplier of the cosine (``100`` gives the number papers report).
        max_length: Token context; defaults to the text tower's positions (77).
        check_inputs: Validate images and prompts on every call.
    """

    default_name = "hps"

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        *,
        spec: RewardSpec | None = None,
        scale: float = 1.0,
        max_length: int | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(spec=spec, check_inputs=check_inputs)
        self.model = model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        config: Any = model.config  # transformers types its sub-configs as optional dicts
        self.image_size = int(config.vision_config.image_size)
        self.max_length = int(max_length or config.text_config.max_position_embeddings)
        self.train(False)

    def validate(self, images: Tensor, cond: RewardCondition) -> None:
        """Images ``(B, 1|3, H, W)`` in ``[0, 1]``; ``cond`` a sequence of B prompts."""
        batch = check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {tuple(images.shape)}")
        check_condition(cond, batch, kind="prompts")

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``(B, max_length)`` of prompts, on the model's device.

        Padded to ``max_length`` like open_clip (truncation keeps the end-of-text token last).
        """
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.model.logit_scale.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(B, E)`` float32 of images ``(B, 1|3, H, W)`` in ``[0, 1]``."""
        dtype = self.model.logit_scale.dtype
        pixels = clip_preprocess(images, self.image_size, mean=CLIP_MEAN, std=CLIP_STD, dtype=dtype)
        pixels = pixels.to(self.model.logit_scale.device)
        # vision_model + visual_projection rather than get_image_features: the latter returns a
        # tensor in transformers 4.x and a ModelOutput in 5.x.
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``(B, E)`` float32 of prompts (no gradient: the text is fixed)."""
        ids, mask = self.tokenize(prompts)
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            feats = self.model.text_projection(pooled).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def score(self, images: Tensor, cond: RewardCondition) -> Tensor:
        """``(B,)`` float32 ``scale · cos`` of images ``(B, C, H, W)`` in ``[0, 1]`` and ``spec.prompt_prefix + cond``."""
        img = self.image_features(images)
        txt = self.text_features(self.prompts(cond)).to(img.device)
        return self.scale * (img * txt).sum(dim=-1)

    def open_clip_state_dict(self) -> dict[str, Tensor]:
        """The model's weights in open_clip keys (the HPS checkpoint's ``"state_dict"``), on CPU."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return transformers_to_open_clip_state_dict(sd)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write an upstream-layout HPS checkpoint ``{"state_dict": open_clip keys}`` to ``path``.

        The tokenizer is not part of the upstream checkpoint; save it with ``tokenizer.save_pretrained``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": self.open_clip_state_dict()}, path)
        return path

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Tensor],
        tokenizer: Any,
        *,
        config: CLIPConfig | None = None,
        vision_head_width: int = 80,
        text_head_width: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **reward_kwargs: Any,
    ) -> HPSReward:
        """Build from an upstream checkpoint (``HPS_v2*_compressed.pt``) and a CLIP tokenizer.

        Args:
            checkpoint: Checkpoint file, or an open_clip state dict already loaded.
            tokenizer: A tokenizer, or a local folder / hub id holding ``vocab.json`` and ``merges.txt``
                of :data:`HPS_TOKENIZER_SOURCE`.
            config: The ``CLIPConfig``; inferred from the weights when ``None`` (ViT-H-14 head widths).
            vision_head_width, text_head_width: For the inference of the head counts.
            device, dtype: Where and in which precision to run the model.
            **reward_kwargs: :class:`HPSReward` arguments (``spec``, ``scale``, ``max_length``, …).

        Raises:
            ImportError: transformers is missing (names the ``rewards`` extra).
            MissingWeightsError: The tokenizer files are missing.
            ValueError: The checkpoint is not an open_clip ViT-CLIP matching ``config``.
        """
        tf = _transformers()
        if isinstance(checkpoint, Mapping):
            sd = _strip_module_prefix(checkpoint)
        else:
            sd = load_open_clip_state_dict(checkpoint)
        tok = _load_clip_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if config is None:
            config = clip_config_from_open_clip_state_dict(
                sd, vision_head_width=vision_head_width, text_head_width=text_head_width
            )
        # Built on the meta device and given the checkpoint's tensors: a ViT-H-14 CLIP has ~986M
        # parameters whose random initialisation would take longer than loading them.
        with torch.device("meta"):
            model = tf.CLIPModel(config)
        model.load_state_dict(open_clip_to_transformers_state_dict(sd, config), strict=True, assign=True)
        for module in (model.text_model.embeddings, model.vision_model.embeddings):
            # position_ids is a non-persistent buffer (not in any state dict): recreate it.
            n = module.position_ids.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"HPS model tensors not loaded from the checkpoint: {leftover[:8]}")
        reward = cls(model, tok, **reward_kwargs)
        return reward.to(device=device, dtype=as_dtype(dtype))


def _find_hps_checkpoint(folder: Path, version: str | None) -> Path:
    names = [HPS_CHECKPOINTS[version]] if version else list(HPS_CHECKPOINTS.values())
    found = [folder / n for n in names if (folder / n).is_file()]
    if not found:
        raise MissingWeightsError(
            f"HPS: {folder} holds none of {names}. Download one from {HPS_SOURCE} on a machine with "
            f"internet (e.g. `huggingface-cli download {HPS_SOURCE} {names[-1]} --local-dir {folder}`)"
        )
    if len(found) > 1:
        raise ValueError(f"HPS: {folder} holds {[p.name for p in found]}; pass version='v2.0' or 'v2.1'")
    return found[0]


def build_hps(
    path: str | os.PathLike[str],
    *,
    spec: RewardSpec | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    version: str | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> HPSReward:
    """Registry builder: an :class:`HPSReward` from a checkpoint file, a folder, or the hub id ``xswu/HPSv2``.

    Layout of a local folder: ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``) and the
    tokenizer files of :data:`HPS_TOKENIZER_SOURCE` either in ``<folder>/tokenizer/`` or in the folder
    itself. For a checkpoint file the same places are searched next to it.

    Args:
        path: Checkpoint file, folder, or hub id.
        spec: The reward's :class:`~dmdr_fast.rewards.spec.RewardSpec`; ``None``:
            ``RewardSpec(name="hps")``.
        device, dtype: Where and in which precision the model runs (dtype may be a name, ``"bfloat16"``).
        version: ``"v2.0"`` or ``"v2.1"``; needed when a folder holds both (hub default ``"v2.1"``).
        tokenizer: Tokenizer object, folder or hub id; found next to the checkpoint when ``None``.
        **kwargs: Further :meth:`HPSReward.from_checkpoint` arguments (``scale``, ``config``,
            ``vision_head_width``, ``max_length``, ``check_inputs``, …).

    Raises:
        MissingWeightsError: Checkpoint or tokenizer not found, naming what to download.
        ImportError: transformers is missing (names the ``rewards`` extra).
    """
    _transformers()  # fail on the missing package before looking for files
    if version is not None and version not in HPS_CHECKPOINTS:
        raise ValueError(f"version must be one of {list(HPS_CHECKPOINTS)}, got {version!r}")
    source = f"{HPS_SOURCE} ({' or '.join(HPS_CHECKPOINTS.values())})"
    where = resolve_local(path, what="HPS", source=source)
    if isinstance(where, str):  # hub id
        checkpoint = hub_file(where, HPS_CHECKPOINTS[version or "v2.1"], what="HPS", extra=HPS_EXTRA)
        tokenizer = HPS_TOKENIZER_SOURCE if tokenizer is None else tokenizer
    else:
        checkpoint = where if where.is_file() else _find_hps_checkpoint(where, version)
        if tokenizer is None:
            folder = checkpoint.parent
            tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    return HPSReward.from_checkpoint(
        checkpoint,
        tokenizer,
        device=device,
        dtype=dtype,
        spec=spec,
        **kwargs,
    )
