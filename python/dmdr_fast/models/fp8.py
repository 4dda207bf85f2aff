"""FP8 frozen linears: e4m3 weights with per-output-channel scales, row-wise FP8 activations.

Most FLOPs of a DMDR step are GEMMs of the frozen guidance network (real/fake/unconditional
scores, the critic's forward and its input-gradient backward). Its weights never receive a
gradient, so they can be stored once in FP8 (half the bytes of bf16) and multiplied in FP8
(docs/fp8.md). One layer computes, for an input ``x`` of shape ``(..., K)``::

    xq, sx = quantize_fp8(x)                     row-wise e4m3, sx (M, 1)
    y      = (xq · sx) @ (Wq · sw)ᵀ + b          torch._scaled_mm, sw (N, 1) per output channel

and its backward returns only the input gradient (``fp8_backward``):

- ``"bf16"``: ``dx = (dy · swᵀ) @ Wq`` in bf16 — the per-channel scales are folded into ``dy``
  and ``Wq`` converts to bf16 exactly (e4m3 ⊂ bf16), one layer at a time, for this GEMM only;
- ``"fp8"``: the same product with ``dy · swᵀ`` quantised row-wise to e4m3 and one
  ``torch._scaled_mm``. e4m3 rather than e5m2 for the gradient: per-row scales already cover the
  gradient's dynamic range, and e4m3 keeps one more mantissa bit.

With ``activations=False`` (``model.fp8_activations: false``) the layer is weight-only (W8A16):
``y = (x @ Wqᵀ) · swᵀ`` in ``x``'s dtype — the same memory, no FP8 GEMM, and score differences
(the DMD direction without CFG, a small fake − real difference) as accurate as bf16, because
quantising the two passes' slightly different activations is what decorrelates their errors.

``torch._scaled_mm`` runs on the CPU too (torch ≥ 2.10), so the real path is what the tests run.
CUDA needs both weight dimensions divisible by 16 (its FP8 kernels' alignment), so such layers are
left in their dtype on every device, and the report says so.

Layers built here are frozen by construction: the weight and scale are buffers, not parameters,
so no optimiser, DDP bucket or trainable checkpoint ever sees them. LoRA wrappers keep working on
top (their factors stay in their own dtype; the per-sample scale is untouched), because a
:class:`~dmdr_fast.models.lora.LoraLayer` only calls its ``base_layer``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dmdr_fast.models.lora import LoraLayer
from dmdr_fast.ops.quantize_fp8 import quantize_fp8

__all__ = [
    "DEFAULT_FP8_EXCLUDE",
    "DEFAULT_FP8_WEIGHT_ONLY",
    "Fp8Backward",
    "Fp8Linear",
    "Fp8Report",
    "dequantize_linears",
    "fp8_linear",
    "fp8_plan",
    "quantize_for_inference",
    "quantize_linears",
]

Tensor = torch.Tensor
Fp8Backward = Literal["fp8", "bf16"]
_E4M3 = torch.float8_e4m3fn
#: CUDA's FP8 GEMMs need K and N divisible by 16; kept the same on every device so that a CPU run
#: quantises exactly the layers a GPU run would.
_ALIGN = 16

#: Module-name patterns (fnmatch, ``*`` also matches dots) never quantised by default: the
#: embeddings (timestep, text, patch, guidance) and the output end (the final norm's modulation and
#: projection). They are ~1-2 % of an MM-DiT's weights, and their error reaches every token of every
#: block (embeddings) or the predicted velocity directly (output end).
DEFAULT_FP8_EXCLUDE: tuple[str, ...] = ("*embed*", "*final*", "norm_out*", "proj_out", "proj_out_*")
#: Patterns of linears stored in FP8 but run weight-only (their input is not quantised): the AdaLN
#: modulation linears inside the blocks' norms. They are large (6·d × d per stream per block: about
#: 30 % of SD3.5's and Flux's weights, so the memory saving needs them) but see one row per sample
#: (the conditioning vector), where an FP8 GEMM gains nothing and per-row activation noise would go
#: straight into the shift/scale/gate of every token.
DEFAULT_FP8_WEIGHT_ONLY: tuple[str, ...] = ("*norm*", "*adaLN*", "*modulation*")


def _scaled_mm(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a·sa) @ (b·sb)`` for FP8 ``a`` (M, K) row-major and ``b`` (K, N) column-major."""
    # CUDA's row-wise FP8 kernel writes bf16 only; the CPU kernel writes any float dtype.
    mm_dtype = torch.bfloat16 if a.device.type == "cuda" else out_dtype
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=mm_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """The FP8 GEMM with an input-only gradient (weights, scales and bias are frozen)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight_fp8: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
        backward: str,
        activations: bool,
    ) -> Tensor:
        K, N = weight_fp8.shape[1], weight_fp8.shape[0]
        x2 = x.reshape(-1, K)
        if activations:
            xq, sx = quantize_fp8(x2.detach(), _E4M3)
            y = _scaled_mm(xq, sx, weight_fp8.t(), weight_scale.view(1, N), out_dtype)
        else:  # weight-only: e4m3 values are exact in bf16/fp16/fp32, the scale goes on the output
            y = (x2.to(out_dtype) @ weight_fp8.to(out_dtype).t()) * weight_scale.view(1, N).to(out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(weight_fp8, weight_scale)
        ctx.x_dtype = x.dtype  # type: ignore[attr-defined]
        ctx.backward_mode = backward  # type: ignore[attr-defined]
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (grad_y,) = grads
        weight_fp8, weight_scale = ctx.saved_tensors  # type: ignore[attr-defined]
        N, K = weight_fp8.shape
        g = grad_y.reshape(-1, N).float() * weight_scale.view(1, N)  # fold sw: dx = (dy·swᵀ) @ Wq
        if ctx.backward_mode == "fp8":  # type: ignore[attr-defined]
            gq, sg = quantize_fp8(g, _E4M3)
            # _scaled_mm wants its second operand column-major: a transient FP8 copy of one layer.
            w_cm = weight_fp8.t().contiguous().t()
            ones = torch.ones(1, K, dtype=torch.float32, device=g.device)
            grad_x = _scaled_mm(gq, sg, w_cm, ones, torch.float32)
        else:
            grad_x = g.to(torch.bfloat16) @ weight_fp8.to(torch.bfloat16)
        grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_y.shape[:-1], K)  # type: ignore[attr-defined]
        return grad_x, None, None, None, None, None, None


def fp8_linear(
    x: Tensor,
    weight_fp8: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    *,
    backward: Fp8Backward = "bf16",
    activations: bool = True,
) -> Tensor:
    """``x @ (weight_fp8 · weight_scale)ᵀ + bias`` with ``x`` quantised row-wise to e4m3.

    Args:
        x: (..., K) float input; the output has the autocast dtype when autocast is on for
            ``x``'s device, else ``x.dtype``.
        weight_fp8: (N, K) ``float8_e4m3fn`` weight, row-major.
        weight_scale: (N, 1) float32 dequantisation scale per output channel.
        bias: optional (N,) bias (any float dtype; added in the output dtype).
        backward: how the input gradient is computed, ``"bf16"`` or ``"fp8"`` (module docstring).
        activations: quantise ``x`` too and run an FP8 GEMM (W8A8, the fast path); False: weight
            only (W8A16) — ``x`` stays in its dtype and meets the e4m3 weight in a regular GEMM,
            saving memory but no compute, with a DMD direction as accurate as bf16 (docs/fp8.md).

    Returns:
        (..., N) tensor.
    """
    if x.shape[-1] != weight_fp8.shape[1]:
        raise ValueError(
            f"fp8_linear: x has {x.shape[-1]} features, the weight expects {weight_fp8.shape[1]}"
        )
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    # Autocast must not re-cast inside: the GEMM's dtypes are chosen here.
    with torch.autocast(device, enabled=False):
        y: Tensor = _Fp8LinearFn.apply(x, weight_fp8, weight_scale, bias, out_dtype, backward, activations)
    return y


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in e4m3 with one scale per output channel.

    Attributes:
        weight_fp8: (out, in) ``float8_e4m3fn`` buffer.
        weight_scale: (out, 1) float32 buffer: ``W ≈ weight_fp8.float() * weight_scale``.
        bias: (out,) buffer in the original dtype, or None.
        dtype: The original weight dtype (what :attr:`weight` dequantises to).
        backward_mode: ``"bf16"`` or ``"fp8"`` (see :func:`fp8_linear`).
        activations: W8A8 (True) or weight-only W8A16 (False), see :func:`fp8_linear`.
    """

    weight_fp8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(
        self,
        weight_fp8: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        dtype: torch.dtype,
        backward: Fp8Backward,
    ) -> None:
        super().__init__()
        if weight_fp8.dtype != _E4M3 or weight_fp8.dim() != 2:
            raise ValueError(f"Fp8Linear: weight must be a 2-D float8_e4m3fn tensor, got {weight_fp8.dtype}")
        if backward not in ("bf16", "fp8"):
            raise ValueError(f"Fp8Linear: backward must be 'bf16' or 'fp8', got {backward!r}")
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.dtype = dtype
        self.backward_mode = backward
        self.activations = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, backward: Fp8Backward = "bf16") -> Fp8Linear:
        """Quantise ``linear``'s weight per output channel (the rows of the (out, in) weight)."""
        with torch.no_grad():
            w = linear.weight.detach()
            q, scale = quantize_fp8(w, _E4M3)  # row r of W = output channel r
            bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, scale, bias, w.dtype, backward)

    @property
    def weight(self) -> Tensor:
        """The dequantised (out, in) weight in :attr:`dtype` (a new tensor, no gradient).

        For code that reads ``.weight`` (LoRA factor dtype/device, merges); the forward never
        builds it."""
        return (self.weight_fp8.float() * self.weight_scale).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(
            x,
            self.weight_fp8,
            self.weight_scale,
            self.bias,
            backward=self.backward_mode,
            activations=self.activations,
        )

    def to_linear(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the dequantised weight (the FP8 rounding stays)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight_fp8.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, backward={self.backward_mode!r}, activations={self.activations}"
        )


@dataclass
class Fp8Report:
    """What :func:`quantize_linears` did.

    Attributes:
        quantized: Names of the layers now in FP8 (LoRA-wrapped ones by the wrapper's name).
        weight_only: Those of ``quantized`` that run weight-only (their input not quantised).
        skipped: Name → reason for every frozen linear left as it was.
        bytes_before: Bytes of the quantised layers' weights before (parameters only).
        bytes_after: Bytes of their FP8 weights plus scales.
    """

    quantized: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        """One line for logs."""
        saved = 1.0 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        return (
            f"fp8: {len(self.quantized)} linears quantised ({len(self.weight_only)} weight-only; {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB, -{100 * saved:.0f} %), {len(self.skipped)} kept"
        )


def _inside_lora(name: str) -> bool:
    """A LoRA wrapper's own parts: its base (handled through the wrapper) and its factors (trained)."""
    return any(f".{part}." in f".{name}." for part in ("base_layer", "lora_A", "lora_B"))


def _excluded(name: str, exclude: Sequence[str]) -> str | None:
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def quantize_linears(
    model: nn.Module,
    *,
    exclude: Sequence[str] = DEFAULT_FP8_EXCLUDE,
    weight_only: Sequence[str] = DEFAULT_FP8_WEIGHT_ONLY,
    backward: Fp8Backward = "bf16",
    activations: bool = True,
    shared: dict[int, Fp8Linear] | None = None,
) -> Fp8Report:
    """Replace the frozen ``nn.Linear`` layers of ``model`` (also LoRA base layers) by :class:`Fp8Linear`.

    A linear is quantised when its type is exactly ``nn.Linear`` (or it is a LoRA wrapper's base),
    its weight does not require grad, no ``exclude`` pattern matches its name and both its
    dimensions are divisible by 16. Trainable linears are never touched.

    Args:
        model: Modified in place.
        exclude: fnmatch patterns of module names to keep (default :data:`DEFAULT_FP8_EXCLUDE`).
        weight_only: patterns of layers quantised but run weight-only (default
            :data:`DEFAULT_FP8_WEIGHT_ONLY`); ``exclude`` wins where both match.
        backward: the layers' input-gradient GEMM, ``"bf16"`` or ``"fp8"``.
        activations: W8A8 FP8 GEMMs (True) or weight-only for every layer (False), see
            :func:`fp8_linear`.
        shared: Cache keyed by ``id`` of an original weight tensor. Networks whose modules share
            one weight tensor (a LoRA student's base is the teacher's) pass the same dict, so they
            share one FP8 copy too instead of quantising it twice.

    Returns:
        An :class:`Fp8Report`.
    """
    shared = {} if shared is None else shared
    report = Fp8Report()
    for name, base, owner, reason in _candidates(model, exclude):
        if reason is not None:
            report.skipped[name] = reason
            continue
        fp8 = shared.get(id(base.weight))
        if fp8 is None or fp8.backward_mode != backward:
            fp8 = shared[id(base.weight)] = Fp8Linear.from_linear(base, backward)
        fp8.activations = activations and _excluded(name, weight_only) is None
        _count(report, name, base)
        if not fp8.activations:
            report.weight_only.append(name)
        if owner is not None:
            owner.base_layer = fp8  # type: ignore[assignment]  # LoraLayer types its base as Linear|Conv2d
        else:
            model.set_submodule(name, fp8)
    return report


def _candidates(
    model: nn.Module, exclude: Sequence[str]
) -> Iterator[tuple[str, nn.Linear, LoraLayer | None, str | None]]:
    """``(name, linear, LoRA wrapper or None, reason to keep it or None)`` per frozen-linear candidate."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base, owner = module.base_layer, module
        elif type(module) is nn.Linear and not _inside_lora(name):
            base, owner = module, None
        else:
            continue
        if type(base) is not nn.Linear:
            continue  # a Conv2d LoRA base, or already FP8
        reason = None
        if base.weight.requires_grad:
            reason = "trainable"
        elif (pattern := _excluded(name, exclude)) is not None:
            reason = f"excluded by {pattern!r}"
        elif base.in_features % _ALIGN or base.out_features % _ALIGN:
            reason = f"{base.out_features}x{base.in_features} not divisible by {_ALIGN}"
        yield name, base, owner, reason


def _count(report: Fp8Report, name: str, base: nn.Linear) -> None:
    report.quantized.append(name)
    report.bytes_before += base.weight.numel() * base.weight.element_size()
    report.bytes_after += base.weight.numel() + base.out_features * 4  # e4m3 + one fp32 scale per row


def fp8_plan(
    model: nn.Module,
    *,
    exclude: Sequence[str] = DEFAULT_FP8_EXCLUDE,
    weight_only: Sequence[str] = DEFAULT_FP8_WEIGHT_ONLY,
) -> Fp8Report:
    """What :func:`quantize_linears` would do, without doing it (works on the meta device).

    Counts a frozen model's linears as they are (set ``requires_grad_(False)`` first on a freshly
    built one): the bytes of their weights now and in FP8 + scales."""
    report = Fp8Report()
    for name, base, _, reason in _candidates(model, exclude):
        if reason is None:
            _count(report, name, base)
            if _excluded(name, weight_only) is not None:
                report.weight_only.append(name)
        else:
            report.skipped[name] = reason
    return report


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replace every :class:`Fp8Linear` of ``model`` by an equivalent plain ``nn.Linear`` (in place).

    The weights are the dequantised FP8 ones (the rounding stays); used before exporting a network
    that must not contain FP8 tensors.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear):
            model.set_submodule(name, module.to_linear())
    return model


def quantize_for_inference(
    network: nn.Module, *, exclude: Sequence[str] = DEFAULT_FP8_EXCLUDE, attention: bool = True
) -> Fp8Report:
    """FP8 sampling: freeze ``network``, quantise its linears and (``attention``) make its no-grad
    attention FP8 (:func:`dmdr_fast.models.attention.use_fp8_attention`). In place.

    Returns:
        The :class:`Fp8Report` of the linears.
    """
    from dmdr_fast.models.attention import use_fp8_attention

    network.requires_grad_(False)
    report = quantize_linears(network, exclude=exclude)
    if attention:
        use_fp8_attention(network)
    return report
