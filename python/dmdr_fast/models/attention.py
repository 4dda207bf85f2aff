"""Route the attention of diffusers transformers through :func:`dmdr_fast.ops.attention`.

:func:`use_attention` swaps the attention *processor* of every attention module of a diffusers model
for one of ours that computes exactly what the native processor computes (projections, q/k norms,
RoPE, joint image + context sequences, output projections) and calls
``dmdr_fast.ops.attention(q, k, v, key_padding_mask=..., backend=backend)`` where the native one
calls ``F.scaled_dot_product_attention`` or ``dispatch_attention_fn``. :func:`restore_attention` puts
the original processor objects back (bit-identical outputs), :func:`attention_backend` does both
around a ``with`` block.

Native processors covered (diffusers 0.42), one of ours each:

- ``AttnProcessor2_0`` → :class:`OpAttnProcessor`: ``DiTTransformer2DModel``'s ``attn1`` (and any
  default ``Attention``, self- or cross-attention).
- ``JointAttnProcessor2_0`` → :class:`OpJointAttnProcessor`: ``SD3Transformer2DModel``'s joint
  image + context attention (``qk_norm``, ``context_pre_only`` last block) and SD3.5's image-only
  ``attn2`` (dual attention).
- ``FluxAttnProcessor`` → :class:`OpFluxAttnProcessor`: ``FluxTransformer2DModel``'s double
  (context + image) and single blocks, RoPE applied before attention, fused q/k/v projections.
- ``ZSingleStreamAttnProcessor`` → :class:`OpZImageAttnProcessor`: ``ZImageTransformer2DModel``'s
  noise / context refiners and main layers (complex RoPE, boolean caption/image padding masks).

Why processors and not diffusers' attention backends (``diffusers.models.attention_dispatch``):

- In diffusers 0.42 only ``FluxAttnProcessor`` and ``ZSingleStreamAttnProcessor`` call
  ``dispatch_attention_fn``. ``AttnProcessor2_0`` (DiT) and ``JointAttnProcessor2_0`` (SD3) call
  ``F.scaled_dot_product_attention`` directly, so no backend reaches two of the four families.
- Backends are keyed by the ``AttentionBackendName`` enum: ``dispatch_attention_fn`` converts
  the name with ``AttentionBackendName(name)`` and ``ModelMixin.set_attention_backend`` /
  ``attention_backend`` validate against its members, so a custom name cannot be registered
  without mutating a closed enum or the private ``_AttentionBackendRegistry`` (and
  ``set_attention_backend`` logs "experimental feature, the API may change" on every call).
- The active backend is process-global (``_AttentionBackendRegistry._active_backend``; even
  ``ModelMixin.set_attention_backend`` sets it), while the Trainer needs per-network choices
  (teacher, critic and student in one process) with no side effect on other models.

Processors are per module, already the documented extension point of ``Attention`` /
``AttentionModuleMixin`` (``set_processor``), cover all four families, and restoring is putting
back the very objects that were there. The cost is that ours restate the native math: the tests
compare every family against the native processor (outputs and parameter gradients), so a
diffusers upgrade that changes it fails them instead of drifting silently.

Conventions reproduced from the native processors:

- Scale: the default ``1/sqrt(head_dim)`` everywhere; like ``AttnProcessor2_0`` we ignore
  ``Attention.scale`` (diffusers' ``scale_qk=False`` modules use ``AttnProcessor``, not covered).
- ``JointAttnProcessor2_0`` ignores any ``attention_mask`` (SD3's pipeline passes none: padded
  T5 tokens are attended to); ours ignores it too, so the outputs stay identical.
- ``ZSingleStreamAttnProcessor`` has no cross-attention (``encoder_hidden_states`` is ignored).

Masks (see :func:`to_key_padding_mask`): the op takes a per-key padding mask only. Boolean
keep-masks (True = attend, SDPA's convention; Z-Image's caption/image padding) and additive float
masks (0 = attend, ≤ -1000 = masked, e.g. diffusers' legacy ``(1 - m)·-10000``) of shape
``(B, Lk)``, ``(B, 1, Lk)``, ``(B, 1, 1, Lk)`` (or batch 1, or ``(Lk,)``) are converted; masks that
vary along the query or head axis, per-head ``(B·H, ...)`` masks and float masks holding other
values (a bias) raise ``ValueError``. Checking a float mask's values costs a host sync; boolean
masks cost nothing. One deliberate difference: a query whose keys are *all* masked gets zeros
(the op's convention) where SDPA gives NaN.

The backend is validated by name when the processors are installed (``None`` = the op's automatic
choice, which also honours ``dmdr_fast.use_backend`` and ``DMDR_FAST_BACKEND``); whether it can run
on the model's device, dtype and head dim is decided by the op at each call
(``BackendUnavailableError``), since models move between devices after setup. ``"native"`` means
diffusers' own processors: ``use_attention(model, "native")`` is :func:`restore_attention`.

Not supported: any other processor class, e.g. IP-adapter processors,
``FusedJointAttnProcessor2_0`` (after SD3's ``fuse_qkv_projections``) or ``AttnProcessor``
(``use_attention`` raises ``TypeError`` before changing anything; ``strict=False`` leaves those
modules on their native processor instead); and processors configured for context parallelism
(``_parallel_config``), which the op does not implement (always ``TypeError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from dmdr_fast import ops as backends  # the op registry (backends.get_backends(op), docs/architecture.md §5)
from dmdr_fast.ops.attention import attention as _attention_op
from dmdr_fast.ops.attention_fp8 import attention_fp8 as _attention_fp8_op

try:  # Flux's processor class exists from diffusers 0.35 (before: FluxAttnProcessor2_0, not covered)
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError:  # pragma: no cover - depends on the diffusers version
    FluxAttnProcessor = None
try:  # Z-Image exists from diffusers 0.36
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
except ImportError:  # pragma: no cover - depends on the diffusers version
    ZSingleStreamAttnProcessor = None

__all__ = [
    "NATIVE",
    "OpAttnProcessor",
    "OpFluxAttnProcessor",
    "OpJointAttnProcessor",
    "OpProcessor",
    "OpZImageAttnProcessor",
    "attention_backend",
    "restore_attention",
    "to_key_padding_mask",
    "use_attention",
    "use_fp8_attention",
]

#: Backend name meaning "diffusers' own processors" (no :func:`dmdr_fast.ops.attention`).
NATIVE = "native"
#: Additive mask entries at or below this count as masked (exp(-1000) underflows to 0 in float32).
MASKED_AT_OR_BELOW = -1000.0

_OP = "attention"
_ATTENTION_MODULES = (Attention, AttentionModuleMixin)
ModelT = TypeVar("ModelT", bound=nn.Module)
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- masks


def to_key_padding_mask(mask: Tensor | None, batch_size: int, kv_len: int) -> Tensor | None:
    """A diffusers attention mask → the op's ``key_padding_mask`` (bool ``(B, Lk)``, True = pad).

    Args:
        mask: ``None``; a bool keep-mask (True = attend) or an additive float mask (0 = attend,
            ``<= -1000`` = masked) of shape ``(Lk,)``, ``(B, Lk)``, ``(B, 1, Lk)`` or
            ``(B, 1, 1, Lk)``, where ``B`` may also be 1 (broadcast).
        batch_size: ``B`` of the attention call.
        kv_len: number of keys ``Lk``.

    Returns:
        ``None`` for ``None``, else the ``(batch_size, kv_len)`` padding mask.

    Raises:
        ValueError: For masks a key padding mask cannot express: other shapes (per query or per
            head), integer masks, or float masks with values other than 0 and ``<= -1000``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention mask must be a tensor, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    if mask.dim() == 1:
        mask = mask[None]
    if (
        mask.dim() > 4
        or mask.shape[-1] != kv_len
        or mask.shape[0] not in (1, batch_size)
        or any(s != 1 for s in mask.shape[1:-1])
    ):
        raise ValueError(
            f"cannot run attention mask of shape {shape} through dmdr_fast.ops.attention, which takes a "
            f"per-key padding mask only: expected (Lk,), (B, Lk), (B, 1, Lk) or (B, 1, 1, Lk) with "
            f"B in (1, {batch_size}) and Lk = {kv_len}; masks varying per query or per head are not "
            "supported (use backend 'native' for this model)"
        )
    mask = mask.reshape(mask.shape[0], kv_len)
    if mask.dtype == torch.bool:
        pad = ~mask
    elif mask.is_floating_point():
        pad = mask <= MASKED_AT_OR_BELOW
        if bool(((mask != 0) & ~pad).any()):  # host sync, float masks only
            raise ValueError(
                "additive attention mask holds values other than 0 (attend) and <= "
                f"{MASKED_AT_OR_BELOW:g} (masked): an attention bias cannot be expressed as a key "
                "padding mask (use backend 'native' for this model)"
            )
    else:
        raise ValueError(f"attention mask must be bool (True = attend) or additive float, got {mask.dtype}")
    return pad.expand(batch_size, kv_len)


# ----------------------------------------------------------------------------- processors


class OpProcessor:
    """Base of our processors: the op's backend plus the native processor this one replaces.

    Subclasses restate one native processor's ``__call__`` with the same parameter names
    (diffusers' attention modules pass only the keyword arguments that appear in the processor's
    signature) and call :meth:`attend` for the attention itself.

    Attributes:
        original: The diffusers processor replaced (restored by :func:`restore_attention`).
        backend: Backend of :func:`dmdr_fast.ops.attention`; ``None`` = automatic.
        fp8_no_grad: Calls made with gradient mode off use :func:`dmdr_fast.ops.attention_fp8`
            (automatic backend) instead; set by :func:`use_fp8_attention`.
    """

    def __init__(self, original: Any, backend: str | None) -> None:
        self.original = original
        self.backend = backend
        self.fp8_no_grad = False

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, H, Lq, D)`` attention of ``(B, H, L, D)`` inputs, a diffusers mask converted."""
        pad = to_key_padding_mask(attention_mask, q.shape[0], k.shape[2])
        # Under autocast, SDPA runs in the autocast dtype; do the same here. Without this a model
        # whose q/k pass through fp32 RMSNorm weights (a full fp32 student under bf16 autocast) would
        # hand the op fp32 q, k and a bf16 v, which the op refuses.
        device = q.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))
        if self.fp8_no_grad and not torch.is_grad_enabled():  # a score pass: nothing to backprop
            return _attention_fp8_op(q, k, v, key_padding_mask=pad)
        return _attention_op(q, k, v, key_padding_mask=pad, backend=self.backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, original={type(self.original).__name__})"


class OpAttnProcessor(OpProcessor):
    """``AttnProcessor2_0`` (self- or cross-attention of ``Attention``; DiT's ``attn1``)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class OpJointAttnProcessor(OpProcessor):
    """``JointAttnProcessor2_0`` (SD3/SD3.5: image tokens first, then context tokens).

    Like the native processor it ignores ``attention_mask`` and, in a ``context_pre_only`` block,
    returns the context part without output projection (the block discards it).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        batch_size, image_len = hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: Tensor) -> Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            ctx_query = heads(attn.add_q_proj(encoder_hidden_states))
            ctx_key = heads(attn.add_k_proj(encoder_hidden_states))
            ctx_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                ctx_query = attn.norm_added_q(ctx_query)
            if attn.norm_added_k is not None:
                ctx_key = attn.norm_added_k(ctx_key)
            query = torch.cat([query, ctx_query], dim=2)
            key = torch.cat([key, ctx_key], dim=2)
            value = torch.cat([value, ctx_value], dim=2)

        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class OpFluxAttnProcessor(OpProcessor):
    """``FluxAttnProcessor`` (context tokens first, then image tokens; RoPE on q and k).

    Double blocks return ``(image, context)`` after their output projections; single blocks
    (``pre_only``, no context) return the attention output without projection, as natively.
    """

    def __call__(
        self,
        attn: AttentionModuleMixin,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if joint:
                ctx = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if joint:
                ctx = tuple(
                    proj(encoder_hidden_states)
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
                )

        query, key, value = (
            x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value)
        )  # (B, L, H, D)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if joint:
            ctx_query, ctx_key, ctx_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in ctx)
            ctx_query = attn.norm_added_q(ctx_query)
            ctx_key = attn.norm_added_k(ctx_key)
            query = torch.cat([ctx_query, query], dim=1)
            key = torch.cat([ctx_key, key], dim=1)
            value = torch.cat([ctx_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        context_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :context_len], hidden_states[:, context_len:]
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def _rotate(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Z-Image RoPE: consecutive channel pairs of ``x (B, L, H, D)`` as complex numbers times
    ``freqs_cis (B, L, D/2)`` (complex), computed in float32 outside autocast."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class OpZImageAttnProcessor(OpProcessor):
    """``ZSingleStreamAttnProcessor`` (Z-Image self-attention, complex RoPE, bool keep-masks)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        freqs_cis: Tensor | None = None,
    ) -> Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # (B, L, H, D)
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _rotate(query, freqs_cis)
            key = _rotate(key, freqs_cis)

        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


# Exact native class → our replacement (subclasses may change the math, so no isinstance).
_REPLACEMENTS: dict[type, type[OpProcessor]] = {
    AttnProcessor2_0: OpAttnProcessor,
    JointAttnProcessor2_0: OpJointAttnProcessor,
}
if FluxAttnProcessor is not None:
    _REPLACEMENTS[FluxAttnProcessor] = OpFluxAttnProcessor
if ZSingleStreamAttnProcessor is not None:
    _REPLACEMENTS[ZSingleStreamAttnProcessor] = OpZImageAttnProcessor


# ----------------------------------------------------------------------------- public API


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, Attention | AttentionModuleMixin]]:
    for name, module in model.named_modules():
        if isinstance(module, _ATTENTION_MODULES) and hasattr(module, "processor"):
            yield name, module


def _check_backend(backend: object) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"attention backend must be a string or None, got {type(backend).__name__}")
    name = str(backend)  # a str Enum member (dmdr_fast.Backend) gives its value
    if name == NATIVE:
        return name
    known = backends.get_backends(_OP)
    if name not in known:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {sorted(known)} (dmdr_fast.ops.attention), "
            f"{NATIVE!r} (diffusers' own processors) or None (automatic)"
        )
    return name


def use_attention(model: ModelT, backend: str | None, *, strict: bool = True) -> ModelT:
    """Make every attention module of ``model`` compute attention with :func:`dmdr_fast.ops.attention`.

    Works on any module containing diffusers attention modules (a transformer, or an adapter such
    as :class:`~dmdr_fast.models.DiTAdapter` holding one). Calling it again switches the backend;
    the native processors stay recorded, so :func:`restore_attention` always goes back to them.
    Modules that share one native processor object (SD3.5's ``attn`` and ``attn2``) share one
    replacement. Parameters, buffers and ``state_dict`` are untouched.

    Args:
        model: The model, modified in place.
        backend: A backend of :func:`dmdr_fast.ops.attention` (``"torch"``, ``"sdpa"``,
            ``"xformers"``, ``"triton"`` once registered), ``None`` for the op's automatic choice,
            or ``"native"`` for diffusers' own processors (same as :func:`restore_attention`).
        strict: Raise on attention modules whose processor has no replacement (default); when
            false, leave those on their native processor.

    Returns:
        ``model``.

    Raises:
        ValueError: Unknown backend name, or no diffusers attention module in ``model``.
        TypeError: (``strict``) a processor without a replacement, or one configured for
            context parallelism; nothing is changed then.
    """
    backend = _check_backend(backend)
    if backend == NATIVE:
        return restore_attention(model)
    plan: list[tuple[Attention | AttentionModuleMixin, Any]] = []
    unsupported: list[str] = []
    found = False
    for name, module in _attention_modules(model):
        found = True
        processor = module.processor
        native = processor.original if isinstance(processor, OpProcessor) else processor
        if type(native) not in _REPLACEMENTS:
            unsupported.append(f"{name or '<model>'} ({type(native).__name__})")
            continue
        if getattr(native, "_parallel_config", None) is not None:
            raise TypeError(
                f"{name}: its {type(native).__name__} is set up for context parallelism, which "
                "dmdr_fast.ops.attention does not implement"
            )
        plan.append((module, native))
    if not found:
        raise ValueError(f"{type(model).__name__} contains no diffusers attention module")
    if unsupported and strict:
        supported = sorted(cls.__name__ for cls in _REPLACEMENTS)
        raise TypeError(
            "use_attention: no dmdr_fast replacement for the processor of "
            + ", ".join(unsupported)
            + f"; supported: {supported} (strict=False leaves these modules native)"
        )
    replacements: dict[int, OpProcessor] = {}
    for module, native in plan:
        replacement = replacements.get(id(native))
        if replacement is None:
            replacement = replacements[id(native)] = _REPLACEMENTS[type(native)](native, backend)
        module.set_processor(replacement)
    return model


def use_fp8_attention(model: ModelT, enabled: bool = True) -> int:
    """Make ``model``'s no-grad attention calls FP8 (:func:`dmdr_fast.ops.attention_fp8`), in place.

    Modules still on diffusers' processors are first routed through :func:`use_attention` with
    the automatic backend (``strict=False``: unsupported processors stay native and full
    precision). Calls with gradient mode on are unchanged, so a pass that trains through the
    network (a critic update) keeps the regular attention and its backward.

    Returns:
        The number of attention modules whose no-grad calls are now FP8.
    """
    if enabled and any(not isinstance(m.processor, OpProcessor) for _, m in _attention_modules(model)):
        # Our processors on the native modules only: the others keep the backend chosen before.
        done = {
            id(m): m.processor for _, m in _attention_modules(model) if isinstance(m.processor, OpProcessor)
        }
        use_attention(model, None, strict=False)
        for _, module in _attention_modules(model):
            if id(module) in done:
                module.set_processor(done[id(module)])
    count = 0
    for _, module in _attention_modules(model):
        if isinstance(module.processor, OpProcessor):
            module.processor.fp8_no_grad = enabled
            count += 1
    return count


def restore_attention(model: ModelT) -> ModelT:
    """Put back the native processor objects that :func:`use_attention` replaced (in place).

    A no-op for modules already on a native processor. Returns ``model``.
    """
    for _, module in _attention_modules(model):
        if isinstance(module.processor, OpProcessor):
            module.set_processor(module.processor.original)
    return model


@contextlib.contextmanager
def attention_backend(model: ModelT, backend: str | None, *, strict: bool = True) -> Iterator[ModelT]:
    """``with attention_backend(model, "sdpa"): ...`` — :func:`use_attention` inside the block.

    On exit every attention module gets back exactly the processor object it had on entry (native
    or ours with another backend), also when the block raises.

    Yields:
        ``model``.
    """
    saved = [(module, module.processor) for _, module in _attention_modules(model)]
    use_attention(model, backend, strict=strict)
    try:
        yield model
    finally:
        for module, processor in saved:
            module.set_processor(processor)
