"""Compile every Triton kernel for a GPU target without a GPU: ``dmdr-fast check-kernels``.

Each launch of :mod:`dmdr_fast.ops.triton_configs` is compiled the way Triton's JIT compiles it on
a first launch — heuristics applied, arguments specialised (16-divisible integers and aligned
pointers, integers equal to 1 as constants), ``triton.compile(ASTSource(...), target=GPUTarget(...))``
— down to a cubin through Triton's bundled ``ptxas`` (docs/architecture.md §6). The interpreter
(``TRITON_INTERPRET=1``) accepts code the GPU compiler rejects; this catches it on a CPU machine.

Per launch and target the table reports ptxas's registers, spill stores and loads (bytes per
thread), stack frame, and the shared memory Triton asks for at launch (``metadata.shared``,
checked against the target's per-block limit: the autotuner skips a configuration that exceeds
it, so that is a failure only when no configuration of its autotune group fits). Any launch that
does not compile is a failure, and the exit status is 1.

Compilation runs in worker processes (spawned: they import the kernels with the interpreter off
and with a private Triton cache, so that every launch is really compiled and logs its ptxas
resource usage).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from dmdr_fast.ops.triton_configs import Launch, Ptr, launches

__all__ = [
    "MAX_SHARED",
    "Result",
    "compile_launch",
    "format_summary",
    "format_table",
    "parse_target",
    "run",
    "run_from_args",
]

#: Largest shared memory one block may use, per compute capability (opt-in maximum), in bytes.
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Result:
    """One launch compiled for one target (the numbers are -1 when it did not compile)."""

    launch: Launch
    arch: int
    ok: bool
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    num_warps: int = -1
    num_stages: int = -1
    seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        """Compiled, and its shared memory fits one block of the target."""
        return self.ok and self.shared <= MAX_SHARED.get(self.arch, MAX_SHARED[80])

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAILED"
        return "ok" if self.fits else "smem > limit"


def parse_target(text: str) -> int:
    """``sm_90`` / ``sm90`` / ``90`` → 90.

    Raises:
        ValueError: not a CUDA compute capability.
    """
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", text.strip())
    if m is None:
        raise ValueError(f"not a CUDA target: {text!r} (expected e.g. sm_90 or sm_80)")
    return int(m.group(1))


class _Pointer:
    """What Triton's specialisation reads of a tensor: its dtype and address."""

    def __init__(self, p: Ptr) -> None:
        import torch

        self.dtype = p.dtype
        offset = 0 if p.aligned else torch.empty((), dtype=p.dtype).element_size()
        self._address = (1 << 20) + offset

    def data_ptr(self) -> int:
        return self._address


def _resolve(launch: Launch) -> tuple[Any, dict[str, Any]]:
    """(the JIT function, the constexpr keywords after the launcher's heuristics ran), as
    ``triton.heuristics`` computes them at launch, outermost first."""
    import importlib

    from triton.runtime.autotuner import Heuristics
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(f"dmdr_fast.kernels.{launch.module}"), launch.kernel)
    kwargs = dict(launch.kwargs)
    while isinstance(fn, Heuristics):
        named = {**dict(zip(fn.arg_names, launch.args, strict=False)), **kwargs}
        for name, rule in fn.values.items():
            kwargs[name] = named[name] = rule(named)
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"kernels.{launch.module}.{launch.kernel} is a {type(fn).__name__}, not a JIT function "
            "(TRITON_INTERPRET=1 was set when it was imported?)"
        )
    return fn, kwargs


def _specialise(fn: Any, launch: Launch, kwargs: dict[str, Any], backend: Any) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as the JIT's binder derives them."""
    import inspect

    from triton._C.libtriton import native_specialize_impl

    bound = inspect.signature(fn.fn).bind(*launch.args, **kwargs)
    bound.apply_defaults()
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        if isinstance(value, Ptr):
            value = _Pointer(value)
        ty, key = native_specialize_impl(
            type(backend), value, param.is_const, not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )  # fmt: skip
        if ty == "constexpr":  # an integer equal to 1
            signature[param.name], constexprs[param.name] = "constexpr", key
            continue
        signature[param.name] = ty
        if isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    return signature, constexprs, attrs


def compile_launch(launch: Launch, arch: int) -> Result:
    """Compile one launch for ``sm_<arch>`` and read ptxas's resource usage; never raises."""
    start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend

        target = GPUTarget("cuda", arch, 32)
        fn, kwargs = _resolve(launch)
        signature, constexprs, attrs = _specialise(fn, launch, kwargs, make_backend(target))
        options = {
            k: v
            for k, v in (("num_warps", launch.num_warps), ("num_stages", launch.num_stages))
            if v is not None
        }
        log = io.StringIO()
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton's notices about its future defaults
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options
            )
    except Exception as exc:  # a kernel that does not compile is what this tool reports
        lines = [line for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        return Result(launch, arch, False, seconds=time.perf_counter() - start, error=" | ".join(lines[:6]))
    text = log.getvalue()
    regs, frame = _PTXAS_REGS.search(text), _PTXAS_FRAME.search(text)
    md = compiled.metadata
    return Result(
        launch, arch, True,
        regs=int(regs.group(1)) if regs else -1,
        stack=int(frame.group(1)) if frame else -1,
        spill_stores=int(frame.group(2)) if frame else -1,
        spill_loads=int(frame.group(3)) if frame else -1,
        shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _init_worker(cache_dir: str) -> None:
    # Before triton is imported here: real JIT functions, a cache of this run only (every launch
    # runs ptxas), and ptxas's -v report printed so that compile_launch can read it.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def _cost(launch: Launch) -> int:
    """Rough compile cost, to start the slow launches first (fp32 attention is the long tail)."""
    import torch

    attention = launch.module == "attention" and "preprocess" not in launch.kernel
    return 2 * attention + (torch.float32 in launch.dtypes)


def run(items: Iterable[Launch], archs: Sequence[int], jobs: int | None = None) -> list[Result]:
    """Compile every launch for every target in ``archs`` (launches needing a newer GPU than a
    target are left out for it), in ``jobs`` worker processes (default: the CPU count)."""
    work = [(launch, arch) for arch in archs for launch in items if arch >= launch.min_arch]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    done: dict[int, Result] = {}
    with tempfile.TemporaryDirectory(prefix="dmdr-triton-aot-") as cache:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(cache,)) as pool:
            first = sorted(range(len(work)), key=lambda i: -_cost(work[i][0]))
            futures = {pool.submit(compile_launch, *work[i]): i for i in first}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
    order = sorted(range(len(work)), key=lambda i: (work[i][0].module, work[i][0].kernel, -work[i][1]))
    return [done[i] for i in order]


def group_failures(results: Sequence[Result]) -> list[str]:
    """Autotune groups (or single launches) of which no configuration can run on a target."""
    groups: dict[tuple[str, int], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.launch.group or f"{r.launch.kernel} {r.launch.label}", r.arch)].append(r)
    return [f"sm_{arch} {name}" for (name, arch), rs in sorted(groups.items()) if not any(r.fits for r in rs)]


def format_table(results: Sequence[Result]) -> str:
    """A markdown table, one row per launch and target."""
    rows = [
        "| kernel | configuration | target | warps | stages | regs | spill st/ld (B) | stack (B) | smem (B) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r.launch.module}.{r.launch.kernel}"
        if r.ok:
            nums = f"{r.num_warps} | {r.num_stages} | {r.regs} | {r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared}"
        else:
            nums = " | ".join(["-"] * 6)
        rows.append(f"| {name} | {r.launch.label} | sm_{r.arch} | {nums} | {r.status} |")
    return "\n".join(rows)


def _summary_key(r: Result) -> tuple[str, str, int]:
    """(kernel, its element type and head-dim block, target): the rows of :func:`format_summary`."""
    words = r.launch.label.split()
    head = words[0] + (f" {words[1]}" if len(words) > 1 and re.fullmatch(r"D\d+", words[1]) else "")
    return f"{r.launch.module}.{r.launch.kernel}", head, r.arch


def format_summary(results: Sequence[Result]) -> str:
    """A short markdown table for docs: per kernel, element type (and head-dim block) and target,
    how many launches compiled, the range of registers, the most spilled bytes and shared memory."""
    groups: dict[tuple[str, str, int], list[Result]] = defaultdict(list)
    for r in results:
        groups[_summary_key(r)].append(r)
    rows = [
        "| kernel | dtype / block | target | compiled | regs | max spill st/ld (B) | max smem (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kernel, head, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        ok = [r for r in rs if r.ok]
        if ok:
            regs = sorted({r.regs for r in ok})
            reg_text = f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}–{regs[-1]}"
            spills = f"{max(r.spill_stores for r in ok)}/{max(r.spill_loads for r in ok)}"
            shared = str(max(r.shared for r in ok))
        else:
            reg_text = spills = shared = "-"
        rows.append(
            f"| {kernel} | {head} | sm_{arch} | {len(ok)}/{len(rs)} | {reg_text} | {spills} | {shared} |"
        )
    return "\n".join(rows)


def _ptxas_report(archs: Sequence[int]) -> list[str]:
    from triton.backends.nvidia.compiler import get_ptxas

    lines = []
    for arch in archs:
        tool = get_ptxas(arch)
        lines.append(f"sm_{arch}: ptxas {tool.version} ({tool.path})")
    return lines


def run_from_args(args: argparse.Namespace) -> int:
    """``dmdr-fast check-kernels`` (its arguments are defined in :mod:`dmdr_fast.cli`): compile,
    print the markdown table, and return 1 if a launch failed or an autotune group cannot run."""
    archs = [parse_target(t) for t in args.target.split(",") if t.strip()]
    modules = None if args.kernels is None else [m.strip() for m in args.kernels.split(",") if m.strip()]
    items = launches(modules, scope=args.scope)
    if args.match:
        items = [x for x in items if args.match in f"{x.kernel} {x.label}"]
    start = time.perf_counter()
    results = run(items, archs, args.jobs)
    elapsed = time.perf_counter() - start
    table = format_table(results) + "\n\nSummary:\n\n" + format_summary(results)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    failed = [r for r in results if not r.ok]
    too_big = [r for r in results if r.ok and not r.fits]
    print(f"\n{len(results)} compilations ({len(items)} launches) in {elapsed:.0f} s", file=sys.stderr)
    seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        seconds[(f"{r.launch.module}.{r.launch.kernel}", r.arch)].append(r.seconds)
    for (name, arch), ts in sorted(seconds.items()):
        print(
            f"  {name} sm_{arch}: {len(ts)} in {sum(ts):.0f} s of compile time (max {max(ts):.1f} s)",
            file=sys.stderr,
        )
    for line in _ptxas_report(archs):
        print(line, file=sys.stderr)
    for r in too_big:
        print(
            f"note: sm_{r.arch} {r.launch.kernel} {r.launch.label}: {r.shared} B shared > limit (autotune skips it)",
            file=sys.stderr,
        )
    for r in failed:
        print(f"FAILED: sm_{r.arch} {r.launch.kernel} {r.launch.label}: {r.error}", file=sys.stderr)
    groups = group_failures(results)
    for g in groups:
        print(f"FAILED: no configuration of {g} fits the target", file=sys.stderr)
    return 1 if failed or groups else 0
