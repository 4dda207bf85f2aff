"""Build the DMDR network roles from a teacher adapter.

- Student G: a copy of the teacher, trained fully (``lora=None``) or through a LoRA on the copy.
- Guidance H(·; λ): the teacher itself, frozen, plus ONE trainable LoRA ψ whose scale λ picks the
  role (0 = teacher, λ_f = fake score, λ_r(s) = DynaDG target; docs/method.md §2).

Order matters: make the student *before* putting the guidance LoRA on the teacher, otherwise the
copy would carry the critic's adapter (:func:`make_student` refuses a teacher that has LoRA).
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from dmdr_fast.models.lora import LoraConfig, inject_lora, lora_layers
from dmdr_fast.models.protocol import FlowModelAdapter

__all__ = ["make_guidance", "make_student"]

AdapterT = TypeVar("AdapterT", bound=FlowModelAdapter)


def make_student(teacher: AdapterT, *, lora: LoraConfig | None = None, share_base: bool = True) -> AdapterT:
    """A student adapter initialised from the teacher (a deep copy of its network).

    Modules the adapter holds outside its network (e.g. a frozen VAE registered on an
    ``nn.Module`` adapter) are shared with the teacher, not copied.

    Args:
        teacher: The teacher adapter; it must not carry LoRA layers yet.
        lora: ``None`` for a full fine-tune (every network parameter trainable), or the LoRA to
            inject into the copy (then only LoRA trains), e.g. rank 64 / alpha 128 for SD3.5. With
            a LoRA the copy's base weights are the teacher's tensors (shared, frozen), not copies.
        share_base: With a LoRA, share the frozen base tensors with the teacher (False: copy them,
            as FSDP needs, where one tensor cannot belong to two sharded networks).

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
    if lora is not None and share_base:
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
