"""Build the DMDR network roles from a teacher adapter, and evaluate several passes in one forward.

- Student G: a copy of the teacher, trained fully (``lora=None``) or through a LoRA on the copy.
- Guidance H(·; λ): the teacher itself, frozen, plus ONE trainable LoRA ψ whose scale λ picks the
  role (0 = teacher, λ_f = fake score, λ_r(s) = DynaDG target; DESIGN §1 "Networks").

Order matters: make the student *before* putting the guidance LoRA on the teacher, otherwise the
copy would carry the critic's adapter (:func:`make_student` refuses a teacher that has LoRA).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from dmdr_fast.models.lora import LoraConfig, inject_lora, lora_layers, lora_scale
from dmdr_fast.models.protocol import Condition, FlowModelAdapter

__all__ = ["batched_velocity", "make_guidance", "make_student"]

AdapterT = TypeVar("AdapterT", bound=FlowModelAdapter)


def make_student(teacher: AdapterT, *, lora: LoraConfig | None = None) -> AdapterT:
    """A student adapter initialised from the teacher (a deep copy of its network).

    Modules the adapter holds outside its network (e.g. a frozen VAE registered on an
    ``nn.Module`` adapter) are shared with the teacher, not copied.

    Args:
        teacher: The teacher adapter; it must not carry LoRA layers yet.
        lora: ``None`` for a full fine-tune (every network parameter trainable), or the LoRA to
            inject into the copy (then only LoRA trains), e.g. rank 64 / alpha 128 for SD3.5. With
            a LoRA the copy's base weights are the teacher's tensors (shared, frozen), not copies.

    Returns:
        A new adapter of the same type.

    Raises:
        ValueError: If the teacher's network already has LoRA layers.
    """
    network = teacher.network
    if any(True for _ in lora_layers(network)):
        raise ValueError(
            "the teacher already carries LoRA layers (the guidance LoRA?); make the student before "
            "calling make_guidance, so that the copy starts from the plain teacher"
        )
    memo: dict[int, object] = {}
    if isinstance(teacher, nn.Module):
        own = {id(t) for t in network.parameters()} | {id(t) for t in network.buffers()}
        for tensor in (*teacher.parameters(), *teacher.buffers()):
            if id(tensor) not in own:
                memo[id(tensor)] = tensor  # deepcopy reuses memo entries: shared, not copied
    if lora is not None:
        # A LoRA student trains only its adapter: its frozen base weights can BE the teacher's
        # (the modules are copied, the tensors shared), which saves a whole copy of a multi-billion
        # parameter network. The teacher's base is frozen too (make_guidance / full critic).
        for tensor in (*network.parameters(), *network.buffers()):
            memo[id(tensor)] = tensor
    student = copy.deepcopy(teacher, memo)
    if lora is None:
        student.network.requires_grad_(True)
    else:
        inject_lora(student.network, lora, freeze_base=True)
    return student


def make_guidance(teacher: AdapterT, lora: LoraConfig, *, copy_teacher: bool = False) -> AdapterT:
    """The guidance network H: the frozen teacher plus a trainable LoRA (scale set per call).

    Args:
        teacher: The teacher adapter. By default it is modified in place — at LoRA scale 0 it still
            *is* the teacher, which is why DMDR needs only two big networks.
        lora: The critic LoRA, e.g. rank 32, alpha 32, gaussian init, attention targets.
        copy_teacher: Work on a deep copy instead (costs a second copy of the teacher).

    Returns:
        The adapter whose network carries the LoRA; every non-LoRA parameter is frozen.
    """
    guidance = copy.deepcopy(teacher) if copy_teacher else teacher
    guidance.network.requires_grad_(False)
    inject_lora(guidance.network, lora, freeze_base=True)
    return guidance


def _scale_vector(
    scales: Sequence[float | torch.Tensor], sizes: Sequence[int], device: torch.device
) -> float | torch.Tensor:
    if all(not isinstance(s, torch.Tensor) for s in scales) and len({float(s) for s in scales}) == 1:
        return float(scales[0])  # one scalar: lets a 0.0 skip the LoRA work entirely
    parts = []
    for s, n in zip(scales, sizes):
        s = torch.as_tensor(s, dtype=torch.float32, device=device)
        if s.dim() == 0:
            s = s.expand(n)
        elif s.shape != (n,):
            raise ValueError(f"a per-sample LoRA scale must have shape ({n},), got {tuple(s.shape)}")
        parts.append(s)
    return torch.cat(parts)


def batched_velocity(
    adapter: FlowModelAdapter,
    x_t: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor | float],
    conds: Sequence[Condition],
    lora_scales: Sequence[float | torch.Tensor] | None = None,
    *,
    lora_adapter: str | None = None,
) -> list[torch.Tensor]:
    """Evaluate k passes of one adapter in ONE forward of size ``B_1 + ... + B_k``.

    The DMDR generator update uses it for the guidance network with
    ``x_t = [x, x, x]``, ``conds = [c, c, null]`` and ``lora_scales = [λ_f, λ_r, λ_r]``, giving
    ``[v_fake, v_cond, v_uncond]``.

    Args:
        adapter: Any adapter.
        x_t: k sample batches, shapes ``(B_i, *sample_shape)``.
        t: k time batches, shapes ``(B_i,)`` (or floats).
        conds: k condition batches of sizes ``B_i``.
        lora_scales: Optional k LoRA scales (floats, 0-dim or ``(B_i,)`` tensors) for the adapter's
            network; ``None`` leaves the current scales.
        lora_adapter: Restrict the scales to this LoRA adapter (default: all adapters).

    Returns:
        k velocities, shapes ``(B_i, *sample_shape)`` (views into one output tensor).
    """
    k = len(x_t)
    if k == 0 or len(t) != k or len(conds) != k or (lora_scales is not None and len(lora_scales) != k):
        raise ValueError(
            "batched_velocity needs equally many (>= 1) x_t, t, conds and lora_scales entries, got "
            f"{len(x_t)}, {len(t)}, {len(conds)}, {None if lora_scales is None else len(lora_scales)}"
        )
    sizes = [int(x.shape[0]) for x in x_t]
    x = torch.cat(list(x_t), dim=0)
    times = [torch.as_tensor(ti, device=x.device) for ti in t]
    times = [ti.expand(n) if ti.dim() == 0 else ti for ti, n in zip(times, sizes)]
    cond = adapter.cat_conditions(conds)
    if lora_scales is None:
        out = adapter.velocity(x, torch.cat(times), cond)
    else:
        with lora_scale(adapter.network, _scale_vector(lora_scales, sizes, x.device), adapter=lora_adapter):
            out = adapter.velocity(x, torch.cat(times), cond)
    return list(out.split(sizes, dim=0))
