"""Every launch configuration of the Triton kernels, as example launches (docs/architecture.md §6).

:data:`REGISTRY` maps each module of ``dmdr_fast.kernels`` to a function that lists the launches
its op launchers can make: which kernel, the positional arguments as the launcher passes them
(tensors as :class:`Ptr` stand-ins: element type and 16-byte alignment), the keyword constexprs,
``num_warps`` / ``num_stages`` and the oldest GPU that may run it. The lists are built from the
launchers' own selection code — :func:`dmdr_fast.ops._common.gpu_triton_grid`, the attention
autotuner's configurations (``kernels.attention.tuned``), :func:`dmdr_fast.ops._attention_common.block_d`,
the backend tables' dtypes — so that a changed launcher changes the list; tests/ops/test_triton_aot.py
checks that the launchers pass nothing outside it. :mod:`dmdr_fast.ops.triton_aot` compiles each one
for a GPU target with no GPU present.

Three scopes (``launches(scope=...)``): ``"all"`` compiles every block / warp / stage
configuration and every dtype a launcher can pick, with the constexprs that only set a loop's trip
count or a partial-sum tile (``ITERS``, ``NBLK_P2``) and the shape flags (``EVEN_*``, mask, pointer
alignment) at a few representative problem shapes; ``"ci"`` is the part of it marked
``Launch.ci`` — every block configuration of every kernel, dropping near-duplicates that cost
compile time (attention in fp16 and FP8 with a non-bf16 output: another element type in the same
code; the aligned attention shape; the middle elementwise shape) and the fp32 attention tiles
beyond the smallest (15-180 s each: ieee-precision ``tl.dot`` is unrolled FMA code); ``"full"`` takes the
whole product of the representative axes too (hours on 2 cores).

A new kernel module ``kernels/<name>.py`` is registered by one function here that returns its
launches and one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from dmdr_fast._native import get_triton_kernels
from dmdr_fast.ops._attention_common import MAX_HEAD_DIM, block_d
from dmdr_fast.ops._common import TRITON_BLOCK, TRITON_MAX_PARTIALS, gpu_triton_grid

__all__ = ["ELEMENTWISE_SHAPES", "REGISTRY", "SCOPES", "SIZE_CONSTEXPRS", "Launch", "Ptr", "launches"]


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: its element type and whether its address is a multiple of 16 bytes
    (Triton specialises a launch on that; a view into a larger tensor may be offset)."""

    dtype: torch.dtype
    aligned: bool = True


@dataclass(frozen=True)
class Launch:
    """One launch a launcher can make, compiled as Triton's JIT would compile it."""

    module: str  # dmdr_fast.kernels.<module>
    kernel: str  # the attribute the launcher calls (a JIT function, possibly wrapped in heuristics)
    label: str  # the configuration, for the table
    args: tuple[Any, ...]  # positional arguments as the launcher passes them; tensors as Ptr
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # constexprs the launcher passes
    num_warps: int | None = None  # None: Triton's default, as the launcher leaves it
    num_stages: int | None = None
    min_arch: int = 80  # the backend tables refuse older GPUs (cuda_capability_check)
    group: str = ""  # autotune group: the launch runs if one configuration of its group fits
    ci: bool = True  # part of the "ci" scope (False: a costly near-duplicate of a launch that is)

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Element types of the tensor arguments, in order."""
        return tuple(a.dtype for a in self.args if isinstance(a, Ptr))

    def flags(self) -> tuple[tuple[str, Any], ...]:
        """The keyword constexprs that are not block sizes or trip counts, sorted."""
        return tuple(sorted((k, v) for k, v in self.kwargs.items() if k not in SIZE_CONSTEXPRS))


#: Constexprs that size blocks or loops (checked against the selection functions, not the spy).
SIZE_CONSTEXPRS = frozenset({"BLOCK_SIZE", "ITERS", "NBLK_P2", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K"})
#: SMs of the GPU the representative shapes are sized for (H100 SXM and H200: 132).
REFERENCE_SM_COUNT = 132
#: (batch, elements per sample) run through :func:`gpu_triton_grid` for the elementwise kernels:
#: one block per sample, one sample large enough to need the most partial sums (``NBLK_P2`` =
#: 4096) — the extremes of the partial-sum tile and the loop — and a batch of 16×128×128 latents
#: (not in the "ci" scope).
ELEMENTWISE_SHAPES = ((64, 1000), (1, 2**30), (8, 16 * 128 * 128))
_ELEMENTWISE_CI_SHAPES = 2
_D_MAX = 2**31 - 1  # D is an i32 kernel argument (one sample of 2^31 elements is out of scope)


def _short(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float8_e4m3fn: "fp8e4m3",
        torch.float8_e5m2: "fp8e5m2",
        torch.uint8: "u8",
    }[dtype]


def _triton_dtypes(op_module: str) -> list[torch.dtype]:
    """The dtypes the op's triton backend accepts (its backend table), in a stable order."""
    import importlib

    table = importlib.import_module(f"dmdr_fast.ops.{op_module}").BACKENDS
    return sorted(table.impls["triton"].dtypes, key=str)


def _pow2_upto(n: int) -> list[int]:
    return [1 << k for k in range(n.bit_length()) if 1 << k <= n]


class _Grid(NamedTuple):
    """One launch shape of the elementwise kernels."""

    label: str
    B: int
    D: int
    block: int
    iters: int
    nblk: int
    nblk_p2: int
    aligned: bool  # every pointer 16-byte aligned (else one element off) and D even (else odd)
    ci: bool = True


def _elementwise_grids(full: bool) -> Iterator[_Grid]:
    """The launch shapes of the elementwise kernels.

    Default: :data:`ELEMENTWISE_SHAPES` through the launcher's :func:`gpu_triton_grid`, each with
    D as given and all pointers aligned, and with D odd and the pointers one element off (views
    into larger tensors: no vector loads). Full: every power-of-two ITERS and NBLK_P2 the grid
    function can return for a D below 2^31, aligned and not.
    """
    if full:
        max_iters = 1
        while -(-_D_MAX // (TRITON_BLOCK * max_iters)) > TRITON_MAX_PARTIALS:
            max_iters *= 2
        sizes = itertools.product(_pow2_upto(max_iters), _pow2_upto(TRITON_MAX_PARTIALS), (True, False))
        for iters, p2, aligned in sizes:
            D = 16 * 1024 + (0 if aligned else 1)
            label = f"ITERS={iters} NBLK_P2={p2} {'aligned' if aligned else 'offset'}"
            yield _Grid(label, 8, D, TRITON_BLOCK, iters, p2, p2, aligned)
        return
    for i, (B, D) in enumerate(ELEMENTWISE_SHAPES):
        for d in (D, D | 1):
            block, iters, nblk = gpu_triton_grid(B, d, REFERENCE_SM_COUNT)
            p2 = 1 << (nblk - 1).bit_length()
            label = f"B={B} D={d} ITERS={iters} NBLK_P2={p2}{'' if d == D else ' offset'}"
            yield _Grid(label, B, d, block, iters, nblk, p2, d == D, i < _ELEMENTWISE_CI_SHAPES)


def _dmd_loss(full: bool) -> list[Launch]:
    """``ops/dmd_loss.py::dmd_loss_fwd_triton``: two launches, one element type, CFG or not."""
    out = []
    for dt, has_u, g in itertools.product(
        _triton_dtypes("dmd_loss"), (True, False), _elementwise_grids(full)
    ):
        x, f32 = Ptr(dt, g.aligned), Ptr(torch.float32)
        part1 = Ptr(torch.float32, g.aligned)  # part[1]: B·nblk floats past part[0]
        label = f"{_short(dt)} {'cfg' if has_u else 'no-cfg'} {g.label}"
        sizes = {"HAS_UNCOND": has_u, "BLOCK_SIZE": g.block, "ITERS": g.iters}
        reduce_args = (x, x, f32, x, x, f32, g.D, 1.0)
        out.append(Launch("dmd_loss", "_dmd_loss_reduce_kernel", label, reduce_args, sizes, ci=g.ci))
        fwd_args = (x, f32, x, x, x, f32, part1, x, f32, g.D, 1.0, 1e-6, 65504.0)
        out.append(
            Launch(
                "dmd_loss", "_dmd_loss_fwd_kernel", label, fwd_args, {**sizes, "NBLK_P2": g.nblk_p2}, ci=g.ci
            )
        )
    return out


def _reward_grad(full: bool) -> list[Launch]:
    """``ops/reward_grad.py::reward_grad_fwd_triton``: fixed mode writes g in the reduction and
    only finishes the statistics after; balanced mode combines in the second launch."""
    out = []
    for dt, balanced, g in itertools.product(
        _triton_dtypes("reward_grad"), (False, True), _elementwise_grids(full)
    ):
        x, f32, i32 = Ptr(dt, g.aligned), Ptr(torch.float32), Ptr(torch.int32)
        label = f"{_short(dt)} {'balanced' if balanced else 'fixed'} {g.label}"
        reduce_kw = {"WRITE_G": not balanced, "BLOCK_SIZE": g.block, "ITERS": g.iters}
        reduce_args = (x, x, x, f32, i32, g.D, g.B, 1.0, 65504.0)
        out.append(
            Launch("reward_grad", "_reward_grad_reduce_kernel", label, reduce_args, reduce_kw, ci=g.ci)
        )
        fwd_kw = {"BALANCED": balanced, "COMBINE": balanced, "BLOCK_SIZE": g.block, "ITERS": g.iters}
        fwd_args = (x, x, f32, i32, x, f32, Ptr(torch.int64), g.D, g.B, g.nblk, 1.0, 1.0, 10.0, 1e-8, 65504.0)
        out.append(
            Launch(
                "reward_grad",
                "_reward_grad_fwd_kernel",
                label,
                fwd_args,
                {**fwd_kw, "NBLK_P2": g.nblk_p2},
                ci=g.ci,
            )
        )
    return out


# ----------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class _Shape:
    """A problem shape of one attention launch: what the heuristics (EVEN_*, MASK_N) and
    Triton's integer specialisation see."""

    name: str
    Lq: int
    Lk: int
    D: int
    has_mask: bool
    ci: bool = True
    B: int = 2
    H: int = 24

    def strides(self, L: int) -> tuple[int, int, int]:
        """(batch, head, row) strides of a contiguous (B, H, L, D) tensor."""
        return self.H * L * self.D, L * self.D, self.D


def _attention_shapes(bd: int, full: bool) -> list[_Shape]:
    """Aligned (lengths a multiple of every block, D = BLOCK_D, no mask: the unmasked fast path)
    and ragged (odd lengths, D = 5/8 of BLOCK_D — 40, 80, 160 are real head dims — and a padding
    mask: every masked branch); full: every combination of the four."""
    ragged_d = bd * 5 // 8
    assert block_d(ragged_d) == bd
    if not full:
        # The ragged shape alone in the "ci" scope: it compiles every masked branch.
        return [
            _Shape("aligned", 4096, 4096, bd, False, ci=False),
            _Shape("ragged", 4429, 4429, ragged_d, True),
        ]
    shapes = []
    for mask, em, en, ed in itertools.product((False, True), repeat=4):
        name = f"mask={int(mask)} even_m={int(em)} even_n={int(en)} even_d={int(ed)}"
        Lq, Lk = (4096 if em else 4429), (4096 if en else 4429)
        shapes.append(_Shape(name, Lq, Lk, bd if ed else ragged_d, mask))
    return shapes


def _mask(s: _Shape) -> tuple[Ptr, int]:
    """``mask_arg``: the uint8 (B, Lk) mask and its batch stride, or the LSE as a placeholder."""
    return (Ptr(torch.uint8), s.Lk) if s.has_mask else (Ptr(torch.float32), 0)


def _fwd_args(s: _Shape, dt: torch.dtype, fp8: bool) -> tuple[Any, ...]:
    """``attention_fwd_triton`` / ``attention_fp8_triton``'s arguments (FP8: e4m3 q, k and V with
    the keys innermost, row stride of Lk rounded up to 16)."""
    f32 = Ptr(torch.float32)
    mask, stride_mb = _mask(s)
    q_stride, k_stride, o_stride = s.strides(s.Lq), s.strides(s.Lk), s.strides(s.Lq)
    if fp8:
        from dmdr_fast.ops.attention_fp8 import FP8_DTYPE

        e4m3 = Ptr(FP8_DTYPE)
        lk_pad = -(-s.Lk // 16) * 16
        v_strides = (s.H * s.D * lk_pad, s.D * lk_pad, 1, lk_pad)
        ptrs = (e4m3, e4m3, e4m3, Ptr(dt), f32, mask, f32)
    else:
        v_strides = (*k_stride, 1)
        ptrs = (Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), f32, mask, f32)
    return (*ptrs, *q_stride, *k_stride, *v_strides, *o_stride, stride_mb, s.H, s.Lq, s.Lk, s.D, 0.18)


def _bwd_args(s: _Shape, dt: torch.dtype, kernel: str) -> tuple[Any, ...]:
    """``attention_bwd_triton``'s arguments of the dK/dV or the dQ kernel."""
    x, f32 = Ptr(dt), Ptr(torch.float32)
    mask, stride_mb = _mask(s)
    q, kv = s.strides(s.Lq), s.strides(s.Lk)
    ptrs: tuple[Ptr, ...]
    strides: tuple[int, ...]
    if kernel == "attention_bwd_dkdv":
        ptrs, strides = (x, x, x, x, x, x, f32, f32, mask), (*q, *kv, *kv, *q, *kv, *kv)
    else:
        ptrs, strides = (x, x, x, x, x, f32, f32, mask), (*q, *kv, *kv, *q, *q)
    return (*ptrs, *strides, stride_mb, s.H, s.Lq, s.Lk, s.D, 0.125)


def _attention(full: bool) -> list[Launch]:
    """``ops/attention.py`` (forward, backward) and ``ops/attention_fp8.py`` (FP8 forward): every
    autotuner configuration of every head-dim block, for every dtype of the backend tables."""
    from dmdr_fast.ops.attention import PREPROCESS_BLOCK_M, _input_precision
    from dmdr_fast.ops.attention_fp8 import fp8_block_d

    kernels = get_triton_kernels("attention")
    out = []
    block_ds = sorted({block_d(D) for D in range(1, MAX_HEAD_DIM + 1)})
    fp8_outs = _triton_dtypes("attention_fp8")
    # (kernel the launcher calls, autotune kind, dtype, fp8)
    variants = [("attention_fwd", "fwd", dt, False) for dt in _triton_dtypes("attention")]
    variants += [("attention_fwd", "fwd", dt, True) for dt in fp8_outs]
    variants += [
        (k, "bwd", dt, False)
        for k in ("attention_bwd_dkdv", "attention_bwd_dq")
        for dt in _triton_dtypes("attention")
    ]
    fp8_block_ds = sorted({fp8_block_d(D) for D in range(1, MAX_HEAD_DIM + 1)})
    tiles = [(v, bd) for v in variants for bd in (fp8_block_ds if v[3] else block_ds)]
    for (kernel, kind, dt, fp8), bd in tiles:
        tuned = kernels.tuned(getattr(kernels, kernel), kind, bd)
        # "ci": bf16 (fp16 compiles the same code with another element type; FP8: the output
        # dtype changes the final store alone), and fp32 at the smallest head-dim block (the
        # larger fp32 tiles take 15-180 s each).
        ci = dt == torch.bfloat16 or (dt == torch.float32 and not fp8 and bd == block_ds[0])
        for s in _attention_shapes(bd, full):
            name = f"{'fp8e4m3→' if fp8 else ''}{_short(dt)} D{bd} {s.name}"
            group = f"{kernel} {name}"
            flags: dict[str, Any] = {"HAS_MASK": s.has_mask}
            if kernel == "attention_fwd":
                flags["FP8"] = fp8
                args = _fwd_args(s, dt, fp8)
            else:
                args = _bwd_args(s, dt, kernel)
            flags["INPUT_PRECISION"] = "tf32" if fp8 else _input_precision(dt)
            for cfg in tuned.configs:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                label = f"{name} M{bm} N{bn} w{cfg.num_warps} s{cfg.num_stages}"
                out.append(
                    Launch(
                        "attention", kernel, label, args, {**flags, **cfg.kwargs, "BLOCK_D": bd},
                        cfg.num_warps, cfg.num_stages, min_arch=89 if fp8 else 80, group=group,
                        ci=s.ci and ci,
                    )
                )  # fmt: skip
    for dt, bd in itertools.product(_triton_dtypes("attention"), block_ds):
        for s in _attention_shapes(bd, full):
            if s.has_mask:  # the preprocess kernel takes no mask: one ragged shape is enough
                s = _Shape(s.name, s.Lq, s.Lk, s.D, False, s.ci)
            o = s.strides(s.Lq)
            args = (Ptr(dt), Ptr(dt), Ptr(torch.float32), *o, *o, s.H, s.Lq, s.D)
            label = f"{_short(dt)} D{bd} {s.name} M{PREPROCESS_BLOCK_M}"
            kw = {"BLOCK_M": PREPROCESS_BLOCK_M, "BLOCK_D": bd}
            out.append(Launch("attention", "attention_bwd_preprocess", label, args, kw, ci=s.ci))
    return list({(x.kernel, x.label): x for x in out}.values())


#: Row lengths K for ``quantize_fp8``: one tile per row (small, odd and the largest), and the
#: two-pass path past 8192 elements; the launcher's block choice depends on K only.
QUANTIZE_FP8_ROW_LENGTHS = (64, 1536, 3073, 8192, 16384)


def _quantize_fp8(full: bool) -> list[Launch]:
    """``ops/quantize_fp8.py::quantize_fp8_fwd_triton`` on a GPU (hardware FP8 cast, ``q`` in the
    FP8 dtype; the CPU interpreter path writes integer codes instead and is not compiled here),
    with the launcher's own block choice, every input dtype and both FP8 formats."""
    from dmdr_fast.ops._common import FP8_DTYPES
    from dmdr_fast.ops.quantize_fp8 import OUT_MAX, _triton_blocks

    out = []
    for dt, fp8, K in itertools.product(_triton_dtypes("quantize_fp8"), FP8_DTYPES, QUANTIZE_FP8_ROW_LENGTHS):
        block_m, block_k, one_pass = _triton_blocks(4096, K, torch.device("cuda"))
        args = (Ptr(dt), Ptr(fp8), Ptr(torch.float32), 4096, K, 1e-12, float("inf"), OUT_MAX[fp8])
        kw = {"BLOCK_M": block_m, "BLOCK_K": block_k, "ONE_PASS": one_pass}
        kw |= {"E4M3": fp8 == torch.float8_e4m3fn, "HW_CAST": True}
        label = f"{_short(dt)}->{_short(fp8)} K={K} BLOCK_M={block_m} BLOCK_K={block_k}"
        ci = full or dt == torch.bfloat16 or K in (1536, 16384)  # the rest: same code, other sizes
        out.append(Launch("quantize_fp8", "quantize_fp8_kernel", label, args, kw, min_arch=89, ci=ci))
    return out


#: Kernel module of ``dmdr_fast.kernels`` → its launches (argument ``full``: the whole product).
REGISTRY: Mapping[str, Callable[[bool], list[Launch]]] = {
    "attention": _attention,
    "dmd_loss": _dmd_loss,
    "reward_grad": _reward_grad,
    "quantize_fp8": _quantize_fp8,
}
SCOPES = ("ci", "all", "full")


def launches(modules: Sequence[str] | None = None, *, scope: str = "all") -> list[Launch]:
    """The launches of ``modules`` (default: every registered kernel module) in ``scope``
    (``"ci"``, ``"all"`` or ``"full"``, see the module's docstring).

    Raises:
        KeyError: a module that is not registered.
        ValueError: an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    names = list(REGISTRY) if modules is None else list(modules)
    unknown = sorted(set(names) - set(REGISTRY))
    if unknown:
        raise KeyError(f"unregistered kernel modules {unknown}; registered: {sorted(REGISTRY)}")
    items = [launch for name in names for launch in REGISTRY[name](scope == "full")]
    return [x for x in items if x.ci] if scope == "ci" else items
