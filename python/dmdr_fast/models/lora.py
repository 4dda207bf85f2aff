"""LoRA for any ``nn.Module``, with a per-sample scale so one forward serves several roles.

DMDR keeps ONE frozen teacher plus ONE trainable LoRA ψ as its guidance network H(·; λ): the LoRA
delta is multiplied by λ, and λ = 0 (teacher), λ_f (fake score) and λ_r(s) (DynaDG target) are
all needed in the same generator update (docs/method.md §2). Here every wrapped layer
computes, for sample b of the batch,

    y_b = base(x_b) + scale[b] · (α / r) · B(A(x_b)),

so a single forward of size 3B with ``scale = [λ_f]·B + [λ_r]·B + [λ_r]·B`` yields v_fake, v_cond
and v_uncond at once. The scale is set with the :func:`lora_scale` context manager; outside of it
every adapter has scale 1.0 (or what :func:`set_lora_scale` stored).

Layout and initialisation follow peft's LoRA so that the exported weights load in diffusers/peft
(see :mod:`dmdr_fast.models.lora_io`): each wrapped module keeps the original as ``base_layer``
and gains ``lora_A.<adapter>`` (down-projection, rank r) and ``lora_B.<adapter>`` (up-projection,
zero-initialised so an injected model starts exactly at the base model). Several named adapters
may share one base, e.g. a LoRA student and the LoRA critic on one frozen teacher.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast

import torch
from torch import nn

__all__ = [
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "ScaleSpec",
    "inject_lora",
    "lora_layers",
    "lora_parameters",
    "lora_scale",
    "merge_and_unload",
    "merged_state_dict",
    "set_lora_scale",
]

LoraInit = Literal["gaussian", "kaiming", "normal"]
#: One scale for every adapter (float or tensor), or a mapping adapter name -> scale. A tensor
#: scale is either 0-dim (one value for the whole batch) or (B,) (one value per sample).
ScaleSpec: TypeAlias = float | torch.Tensor | Mapping[str, float | torch.Tensor]

# Exact types on purpose: subclasses such as nn.MultiheadAttention's out_proj are used through
# their `.weight` by the parent, never called, so wrapping them would silently do nothing.
_SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)
_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class LoraConfig:
    """How to inject one LoRA adapter.

    Attributes:
        targets: Module-name patterns, matched against fully qualified names from
            ``model.named_modules()``. A plain pattern is an ``fnmatch`` glob (``*`` also matches
            dots), e.g. ``"transformer_blocks.*.attn1.to_q"``; a pattern starting with ``"re:"``
            is a regular expression that must match the whole name. Only ``nn.Linear`` and
            ``nn.Conv2d`` modules (exact types) are wrapped; every pattern must match at least one.
        rank: LoRA rank r.
        alpha: LoRA alpha; the delta is scaled by ``alpha / rank``. ``None`` means ``alpha = rank``
            (scaling 1, the convention diffusers assumes when a file carries no alpha).
        init: Initialisation of A (B is always zero): ``"gaussian"`` = N(0, 1/r²) (peft's
            ``init_lora_weights="gaussian"``, used by the DMDR text-to-image scripts),
            ``"kaiming"`` = kaiming-uniform like ``nn.Linear`` (peft's default), ``"normal"`` =
            N(0, 1) (the unscaled init of the DMDR SiT critic).
        adapter: Adapter name; must be a Python identifier (it becomes a submodule name).
    """

    targets: tuple[str, ...]
    rank: int = 32
    alpha: float | None = None
    init: LoraInit = "gaussian"
    adapter: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise TypeError(
                f"LoraConfig.targets must be a sequence of patterns, got the string {self.targets!r}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: give at least one module-name pattern")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0 or None, got {self.alpha!r}")
        if self.init not in ("gaussian", "kaiming", "normal"):
            raise ValueError(f"LoraConfig.init must be 'gaussian', 'kaiming' or 'normal', got {self.init!r}")
        _check_adapter_name(self.adapter)

    @property
    def lora_alpha(self) -> float:
        """The effective alpha (``rank`` when ``alpha`` is None)."""
        return float(self.rank) if self.alpha is None else float(self.alpha)


class LoraLayer(nn.Module):
    """Base class of the wrappers: ``base_layer`` plus named low-rank adapters.

    Subclasses build the two factors (:meth:`_make_factors`) and the dense weight update
    (:meth:`delta_weight`); the forward pass and the per-sample scale live here.
    """

    base_layer: nn.Linear | nn.Conv2d

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_rank: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        # Runtime scale per adapter: a float, a 0-dim tensor or a (B,) tensor (see lora_scale).
        self.lora_scales: dict[str, float | torch.Tensor] = {}
        self.module_name = module_name

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads ``module.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def _make_factors(
        self, rank: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Linear | nn.Conv2d, nn.Linear | nn.Conv2d]:
        raise NotImplementedError

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense weight update ``(α/r)·B·A`` of one adapter, shaped like the base weight, in fp32."""
        raise NotImplementedError

    def add_adapter(self, adapter: str, rank: int, alpha: float, init: LoraInit) -> None:
        """Create adapter ``adapter`` (A initialised per ``init``, B = 0, scale 1.0)."""
        if adapter in self.lora_A:
            raise ValueError(f"LoRA adapter {adapter!r} already exists on module {self.module_name!r}")
        weight = self.base_layer.weight
        # Keep trainable LoRA factors in fp32 when the base is low precision (fp32 master weights,
        # docs/architecture.md §2); autocast still runs the matmuls in bf16.
        dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        down, up = self._make_factors(rank, dtype, weight.device)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(down.weight, std=1.0 / rank)
            elif init == "kaiming":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(down.weight, std=1.0)
            nn.init.zeros_(up.weight)
        self.lora_A[adapter] = down
        self.lora_B[adapter] = up
        self.lora_rank[adapter] = rank
        self.lora_alpha[adapter] = float(alpha)
        self.lora_scales[adapter] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ_adapters scale·(α/r)·B(A(x))``, the scale broadcast over non-batch dims.

        Args:
            x: Input of the base layer, batch first: ``(B, ..., in)`` for Linear,
                ``(B, C_in, H, W)`` for Conv2d.

        Returns:
            Output of the base layer's shape and dtype.

        Raises:
            ValueError: If a per-sample scale has a length other than ``x.shape[0]``.
        """
        out = self.base_layer(x)
        for adapter, down in self.lora_A.items():
            scale = self.lora_scales[adapter]
            if not isinstance(scale, torch.Tensor) and scale == 0.0:
                continue  # skip the work entirely: identical to the base, and no gradient to ψ
            factor = self.lora_alpha[adapter] / self.lora_rank[adapter]
            h = down(x.to(_factor_weight(down).dtype))
            # Scale the rank-r activation rather than the output: same result, r/out as many flops.
            h = h * _per_sample(scale * factor, h, x, self.module_name)
            out = out + self.lora_B[adapter](h).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        parts = [f"{a}: r={self.lora_rank[a]}, alpha={self.lora_alpha[a]:g}" for a in self.lora_A]
        return "adapters={" + ", ".join(parts) + "}"


class LoraLinear(LoraLayer):
    """LoRA around an ``nn.Linear``: A is ``Linear(in, r)``, B is ``Linear(r, out)``, no biases."""

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def _make_factors(
        self, rank: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Linear, nn.Linear]:
        down = nn.Linear(self.in_features, rank, bias=False, dtype=dtype, device=device)
        return down, nn.Linear(rank, self.out_features, bias=False, dtype=dtype, device=device)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        a = _factor_weight(self.lora_A[adapter]).float()  # (r, in)
        b = _factor_weight(self.lora_B[adapter]).float()  # (out, r)
        return (b @ a) * (self.lora_alpha[adapter] / self.lora_rank[adapter])


class LoraConv2d(LoraLayer):
    """LoRA around an ``nn.Conv2d`` (peft layout): A is the base conv with r output channels, B a 1×1 conv."""

    base_layer: nn.Conv2d

    def __init__(self, base_layer: nn.Conv2d, module_name: str = "") -> None:
        if base_layer.groups != 1 or base_layer.dilation != (1, 1) or base_layer.padding_mode != "zeros":
            raise ValueError(
                f"LoRA on Conv2d {module_name!r} needs groups=1, dilation=1 and padding_mode='zeros' "
                f"(got groups={base_layer.groups}, dilation={base_layer.dilation}, "
                f"padding_mode={base_layer.padding_mode!r})"
            )
        super().__init__(base_layer, module_name)
        self.in_channels = base_layer.in_channels
        self.out_channels = base_layer.out_channels

    def _make_factors(
        self, rank: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[nn.Conv2d, nn.Conv2d]:
        base = self.base_layer
        # torch types Conv2d's kernel_size/stride/padding as tuple[int, ...]; they are pairs (or a str).
        down = nn.Conv2d(
            self.in_channels,
            rank,
            cast(tuple[int, int], base.kernel_size),
            stride=cast(tuple[int, int], base.stride),
            padding=cast("tuple[int, int] | str", base.padding),
            bias=False,
            dtype=dtype,
            device=device,
        )
        up = nn.Conv2d(rank, self.out_channels, 1, bias=False, dtype=dtype, device=device)
        return down, up

    def delta_weight(self, adapter: str) -> torch.Tensor:
        a = _factor_weight(self.lora_A[adapter]).float()  # (r, in, kh, kw)
        b = _factor_weight(self.lora_B[adapter]).float()  # (out, r, 1, 1)
        delta = (b.flatten(1) @ a.flatten(1)).view(self.out_channels, *a.shape[1:])
        return delta * (self.lora_alpha[adapter] / self.lora_rank[adapter])


def _factor_weight(factor: nn.Module) -> nn.Parameter:
    """The weight of a LoRA factor (one of the nn.Linear / nn.Conv2d modules built by ``_make_factors``)."""
    weight = factor.weight
    assert isinstance(weight, nn.Parameter)
    return weight


def _per_sample(
    scale: float | torch.Tensor, h: torch.Tensor, x: torch.Tensor, name: str
) -> float | torch.Tensor:
    """Shape a scale so it multiplies sample b of ``h`` (batch first) by ``scale[b]``."""
    if not isinstance(scale, torch.Tensor):
        return scale
    scale = scale.to(device=h.device, dtype=h.dtype)
    if scale.dim() == 0:
        return scale
    if h.dim() < 2 or h.shape[0] != scale.shape[0]:
        raise ValueError(
            f"LoRA layer {name!r}: the per-sample scale has {scale.shape[0]} entries but this layer's "
            f"input {tuple(x.shape)} does not have that batch size in dim 0. The model reshapes its batch "
            "before this layer (e.g. attention that folds heads or frames into the batch, or a "
            "sequence-first layout); leave this module out of the LoRA targets or use a scalar scale."
        )
    return scale.view(-1, *([1] * (h.dim() - 1)))


def _check_adapter_name(adapter: str) -> None:
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise ValueError(f"LoRA adapter name must be a Python identifier, got {adapter!r}")


def _wrap(module: nn.Module, name: str) -> LoraLayer:
    if type(module) is nn.Linear:
        return LoraLinear(module, name)
    if type(module) is nn.Conv2d:
        return LoraConv2d(module, name)
    raise TypeError(f"cannot put LoRA on module {name!r} of type {type(module).__name__}")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _match_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the wrappable modules matched by ``patterns``; raises if a pattern matches none."""
    candidates: list[str] = []
    unsupported: list[str] = []
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_lora):
            continue  # the root cannot be replaced in place; LoRA internals are not targets
        if isinstance(module, LoraLayer):
            inside_lora.append(name)
            candidates.append(name)
        elif type(module) in _SUPPORTED_TYPES:
            candidates.append(name)
        else:
            unsupported.append(name)
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if _matches(n, pattern)]
        if not hits:
            other = [n for n in unsupported if _matches(n, pattern)]
            hint = f" It matched only unsupported modules {other[:5]}." if other else ""
            raise ValueError(
                f"LoRA target pattern {pattern!r} matched no nn.Linear/nn.Conv2d module.{hint} "
                f"Some valid names: {candidates[:8]}"
            )
        selected.extend(n for n in hits if n not in selected)
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(selected, key=order.__getitem__)


def _attach(model: nn.Module, name: str, adapter: str, rank: int, alpha: float, init: LoraInit) -> LoraLayer:
    module = model.get_submodule(name)
    if not isinstance(module, LoraLayer):
        module = _wrap(module, name)
        model.set_submodule(name, module)
    module.add_adapter(adapter, rank, alpha, init)
    return module


def _freeze_non_lora(model: nn.Module) -> None:
    lora_ids = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        if id(p) not in lora_ids:
            p.requires_grad_(False)


def inject_lora(model: nn.Module, config: LoraConfig, *, freeze_base: bool = True) -> list[str]:
    """Wrap the modules matched by ``config.targets`` with LoRA adapter ``config.adapter``, in place.

    The injected model computes exactly what it computed before (B = 0). Modules that already
    carry other adapters get one more.

    Args:
        model: Any module, e.g. a diffusers transformer.
        config: Targets, rank, alpha, init and adapter name.
        freeze_base: Set ``requires_grad=False`` on every parameter that is not a LoRA factor, so
            only LoRA trains (all adapters' factors stay trainable).

    Returns:
        Qualified names of the wrapped modules, in ``named_modules`` order.

    Raises:
        ValueError: If a pattern matches no supported module or the adapter already exists.
    """
    names = _match_targets(model, config.targets)
    for name in names:
        _attach(model, name, config.adapter, config.rank, config.lora_alpha, config.init)
    if freeze_base:
        _freeze_non_lora(model)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(qualified name, layer)`` for every LoRA wrapper in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """Yield the LoRA factors (A then B per layer) of one adapter, or of all adapters if ``None``.

    Raises:
        ValueError: If ``adapter`` is given and no layer has it.
    """
    found = False
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            if adapter is None or name == adapter:
                found = True
                yield _factor_weight(layer.lora_A[name])
                yield _factor_weight(layer.lora_B[name])
    if adapter is not None and not found:
        raise ValueError(f"no LoRA adapter named {adapter!r} in the model")


def _resolve_scales(
    layers: Sequence[LoraLayer], scales: ScaleSpec, adapter: str | None
) -> dict[str, float | torch.Tensor]:
    known = sorted({a for layer in layers for a in layer.lora_A})
    if isinstance(scales, Mapping):
        if adapter is not None:
            raise ValueError("give either a mapping of scales or `adapter`, not both")
        assignment = dict(scales)
    elif adapter is not None:
        assignment = {adapter: scales}
    else:
        assignment = dict.fromkeys(known, scales)
    for name, value in assignment.items():
        if name not in known:
            raise ValueError(f"no LoRA adapter named {name!r} in the model (adapters: {known})")
        assignment[name] = _check_scale(value)
    return assignment


def _check_scale(value: object) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() > 1:
            raise ValueError(
                f"a LoRA scale tensor must be floating point with shape () or (B,), got "
                f"dtype {value.dtype} and shape {tuple(value.shape)}"
            )
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"a LoRA scale must be a float or a tensor, got {type(value).__name__}")


def _require_layers(model: nn.Module) -> list[LoraLayer]:
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA layers: call inject_lora (or load_lora) first")
    return layers


def set_lora_scale(model: nn.Module, scales: ScaleSpec, adapter: str | None = None) -> None:
    """Set the persistent scale(s) used outside :func:`lora_scale` blocks.

    Args:
        model: A model with LoRA layers.
        scales: A float or tensor applied to ``adapter`` (all adapters if ``None``), or a mapping
            adapter name → scale.
        adapter: Restrict a single scale to one adapter.
    """
    layers = _require_layers(model)
    for name, value in _resolve_scales(layers, scales, adapter).items():
        for layer in layers:
            if name in layer.lora_A:
                layer.lora_scales[name] = value


@contextlib.contextmanager
def lora_scale(model: nn.Module, scales: ScaleSpec, adapter: str | None = None) -> Iterator[None]:
    """Temporarily scale LoRA deltas, globally or per sample; restores the previous scales on exit.

    Example: fake, conditional and unconditional scores of the guidance network in one forward::

        x = torch.cat([x_tau, x_tau, x_tau]); t = torch.cat([tau, tau, tau])
        s = torch.cat([x.new_full((B,), lam_f), x.new_full((2 * B,), lam_r)])
        with lora_scale(guidance.network, s):
            v_fake, v_cond, v_uncond = guidance.velocity(x, t, cond_cond_null).chunk(3)

    Args:
        model: A model with LoRA layers.
        scales: A float, a 0-dim tensor, a ``(B,)`` tensor (sample b's delta is multiplied by
            ``scales[b]``; B must equal dim 0 of every wrapped layer's input), or a mapping
            adapter name → such a scale. A float 0.0 skips the adapter's computation.
        adapter: Apply a single scale to this adapter only; by default it applies to all.

    Raises:
        ValueError: If the model has no LoRA, an adapter is unknown or a tensor has a bad shape.
    """
    layers = _require_layers(model)
    assignment = _resolve_scales(layers, scales, adapter)
    saved = [dict(layer.lora_scales) for layer in layers]
    try:
        for name, value in assignment.items():
            for layer in layers:
                if name in layer.lora_A:
                    layer.lora_scales[name] = value
        yield
    finally:
        for layer, previous in zip(layers, saved):
            layer.lora_scales = previous


def _merge_scales(layer: LoraLayer, scale: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(scale, Mapping):
        return {a: float(scale.get(a, 0.0)) for a in layer.lora_A}
    return dict.fromkeys(layer.lora_A, float(scale))


def _require_plain_bases(model: nn.Module, what: str) -> None:
    """Merging writes into ``base_layer.weight``: refuse bases that are not plain Linear/Conv2d
    (an FP8 base's ``weight`` is a dequantised copy, so a merge into it would vanish)."""
    odd = [f"{n} ({type(layer.base_layer).__name__})" for n, layer in lora_layers(model)
           if type(layer.base_layer) not in _SUPPORTED_TYPES]  # fmt: skip
    if odd:
        raise TypeError(
            f"{what}: LoRA base layers {odd[:3]} are not nn.Linear/nn.Conv2d; FP8 bases: call "
            "dmdr_fast.models.fp8.dequantize_linears(model) first (the FP8 rounding stays)"
        )


def merged_state_dict(model: nn.Module, scale: float | Mapping[str, float] = 1.0) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: LoRA folded into the base weights.

    Keys are those of the model before injection (``<name>.weight``, no ``base_layer`` or
    ``lora_*`` entries), so the result loads into a fresh instance of the original class — this is
    how a LoRA student is exported as a full model. The model is not modified.

    Args:
        model: A model with LoRA layers.
        scale: LoRA scale to fold in, for all adapters (float) or per adapter (mapping; adapters
            missing from it are left out).

    Returns:
        A new state dict; merged weights keep the base weights' dtype (the sum is done in fp32).
    """
    _require_plain_bases(model, "merged_state_dict")
    state = model.state_dict()
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix + "lora_A.") or k.startswith(prefix + "lora_B.")]:
            del state[key]
        for key in [k for k in state if k.startswith(prefix + "base_layer.")]:
            state[prefix + key[len(prefix + "base_layer.") :]] = state.pop(key)
        weight = state[prefix + "weight"]
        merged = weight.float()
        for adapter, s in _merge_scales(layer, scale).items():
            if s != 0.0:
                merged = merged + s * layer.delta_weight(adapter).detach().to(weight.device)
        state[prefix + "weight"] = merged.to(weight.dtype)
    return state


def merge_and_unload(model: nn.Module, scale: float | Mapping[str, float] = 1.0) -> nn.Module:
    """Fold LoRA into the base weights in place and put the original modules back.

    Args:
        model: A model with LoRA layers; modified in place.
        scale: As in :func:`merged_state_dict`.

    Returns:
        ``model``, now free of LoRA layers.
    """
    _require_plain_bases(model, "merge_and_unload")
    for name, layer in list(lora_layers(model)):
        base = layer.base_layer
        with torch.no_grad():
            delta = torch.zeros_like(base.weight, dtype=torch.float32)
            for adapter, s in _merge_scales(layer, scale).items():
                delta += s * layer.delta_weight(adapter).to(delta.device)
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        model.set_submodule(name, base)
    return model
