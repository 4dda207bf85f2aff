"""The ahead-of-time compile check of the Triton kernels (docs/architecture.md §6).

Two halves: the registry (``ops/triton_configs.py``) lists every kernel and every configuration the
launchers can choose — checked against the kernels' sources, the launchers' selection functions and
the launchers themselves (run under the interpreter with the kernels replaced by recorders) — and
the compile path (``ops/triton_aot.py``) turns one small launch into a cubin for sm_90.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
from pathlib import Path

import pytest
import torch

from dmdr_fast.ops import triton_aot, triton_configs
from dmdr_fast.ops._attention_common import AttentionInputs, block_d
from dmdr_fast.ops._common import gpu_triton_grid
from dmdr_fast.ops.attention_fp8 import fp8_block_d
from dmdr_fast.ops.triton_configs import SIZE_CONSTEXPRS, Launch, Ptr

pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _entry_kernels(path: Path) -> set[str]:
    """@triton.jit functions of a kernel module that no other JIT function of it calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    jitted = [
        f
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in f.decorator_list)
    ]
    called = {
        n.func.id
        for f in jitted
        for n in ast.walk(f)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    return {f.name for f in jitted} - called


def _function_name(module: str, attr: str) -> str:
    """The Python function behind a kernel attribute (through heuristics and JIT wrappers)."""
    obj = getattr(importlib.import_module(f"dmdr_fast.kernels.{module}"), attr)
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj.__name__


def test_every_kernel_module_and_kernel_is_registered():
    modules = {p.stem: _entry_kernels(p) for p in KERNELS.glob("*.py") if _entry_kernels(p)}
    assert set(triton_configs.REGISTRY) == set(modules), (
        "register new kernel modules in ops/triton_configs.py"
    )
    for module, kernels in modules.items():
        listed = {_function_name(module, x.kernel) for x in triton_configs.launches([module])}
        assert listed == kernels, (
            f"kernels/{module}.py: unregistered {kernels - listed}, unknown {listed - kernels}"
        )


def test_grid_choices_of_the_elementwise_launchers_are_registered():
    full = triton_configs.launches(["dmd_loss", "reward_grad"], scope="full")
    sizes = {(x.kwargs["BLOCK_SIZE"], x.kwargs["ITERS"], x.kwargs.get("NBLK_P2")) for x in full}
    blocks_iters = {(b, i) for b, i, _ in sizes}
    pairs = {(b, i, p) for b, i, p in sizes if p is not None}
    Ds = {1, 15, 16, 1000, 1024, 4097, 2**31 - 1} | {2**k + j for k in range(4, 31) for j in (-1, 0, 1)}
    for sm, B, D in itertools.product((16, 78, 108, 132, 144), (1, 2, 7, 64, 1000), Ds):
        block, iters, nblk = gpu_triton_grid(B, D, sm)
        assert (block, iters) in blocks_iters, (sm, B, D)
        assert (block, iters, 1 << (nblk - 1).bit_length()) in pairs, (sm, B, D)
    # the default set takes its shapes through the same function
    default = triton_configs.launches(["dmd_loss"])
    expected = {
        gpu_triton_grid(B, D, triton_configs.REFERENCE_SM_COUNT)[1]
        for B, D in triton_configs.ELEMENTWISE_SHAPES
    }
    assert expected <= {x.kwargs["ITERS"] for x in default}


def test_attention_blocks_are_the_autotuners():
    from dmdr_fast.kernels import attention as kernels
    from dmdr_fast.ops.attention import PREPROCESS_BLOCK_M

    items = triton_configs.launches(["attention"])
    assert {x.kwargs["BLOCK_D"] for x in items if not x.kwargs.get("FP8")} == {
        block_d(D) for D in range(1, 257)
    }
    fp8_tiles = {x.kwargs["BLOCK_D"] for x in items if x.kwargs.get("FP8")}
    assert fp8_tiles == {fp8_block_d(D) for D in range(1, 257)} and min(fp8_tiles) >= 32  # e4m3 dot: K >= 32
    for kernel, kind in (
        ("attention_fwd", "fwd"),
        ("attention_bwd_dkdv", "bwd"),
        ("attention_bwd_dq", "bwd"),
    ):
        for bd in {block_d(D) for D in range(1, 257)}:
            listed = {
                (x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"], x.num_warps, x.num_stages)
                for x in items
                if x.kernel == kernel and x.kwargs["BLOCK_D"] == bd
            }
            tuned = kernels.tuned(getattr(kernels, kernel), kind, bd).configs
            assert listed == {
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned
            }
    assert {x.kwargs["BLOCK_M"] for x in items if x.kernel == "attention_bwd_preprocess"} == {
        PREPROCESS_BLOCK_M
    }


class _Recorder:
    """Stands in for a kernel: records (kernel, tensor dtypes, flag constexprs) of each launch."""

    def __init__(self, name: str, calls: set) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            flags = tuple(sorted((k, v) for k, v in kwargs.items() if k not in SIZE_CONSTEXPRS))
            self.calls.add((self.name, dtypes, flags))

        return launch


def _registered() -> set:
    return {(x.kernel, x.dtypes, x.flags()) for x in triton_configs.launches()}


def _record(monkeypatch, calls: set, module: str, names: list[str]) -> None:
    kernels = importlib.import_module(f"dmdr_fast.kernels.{module}")
    for name in names:
        monkeypatch.setattr(kernels, name, _Recorder(name, calls))


def test_the_launchers_make_exactly_the_registered_launches(monkeypatch):
    """Kernel, tensor dtypes and flag constexprs of every launch the launchers make (every dtype,
    CFG or not, both reward modes, mask or not, FP8) equal the registry's: nothing is missing
    from it and it lists nothing the launchers cannot do."""
    attention, attention_fp8, dmd_loss, reward_grad = (
        importlib.import_module(f"dmdr_fast.ops.{m}")
        for m in ("attention", "attention_fp8", "dmd_loss", "reward_grad")
    )
    # quantize_fp8 is left out: on the CPU its launcher takes the interpreter path (integer codes,
    # HW_CAST=False) that a GPU never compiles; its GPU launches are checked in the next test.
    registered = {
        x for x in _registered() if x[0] != "quantize_fp8_kernel"
    }  # before the kernels are replaced
    calls: set = set()
    _record(monkeypatch, calls, "dmd_loss", ["_dmd_loss_reduce_kernel", "_dmd_loss_fwd_kernel"])
    _record(monkeypatch, calls, "reward_grad", ["_reward_grad_reduce_kernel", "_reward_grad_fwd_kernel"])
    kernels = ["attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_preprocess"]
    _record(monkeypatch, calls, "attention", kernels)
    t = torch.rand(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 5, dtype=dtype)
        for u in (x, None):
            dmd_loss.dmd_loss_fwd_triton(dmd_loss.DmdLossInputs(x, x, t, x, x, u, 2.0, 1e-6))
        for balanced in (False, True):
            reward_grad.reward_grad_fwd_triton(
                reward_grad.RewardGradInputs(x, x, balanced, 1.0, 1.0, 10.0, 1e-8)
            )
        q = torch.randn(1, 2, 20, 24, dtype=dtype)
        for mask in (None, torch.zeros(1, 20, dtype=torch.bool)):
            p = AttentionInputs(q, q, q, mask, 0.2)
            out, lse = attention.attention_fwd_triton(p)
            attention.attention_bwd_triton(p, out, out, lse)
            attention_fp8.attention_fp8_triton(p)
    missing, phantom = calls - registered, registered - calls
    assert not missing, f"launches missing from ops/triton_configs.py: {sorted(missing, key=str)}"
    assert not phantom, f"registered launches no launcher makes: {sorted(phantom, key=str)}"


def test_quantize_fp8_launches_use_the_launchers_gpu_blocks():
    from dmdr_fast.ops.quantize_fp8 import BACKENDS, _triton_blocks

    got = triton_configs.launches(["quantize_fp8"])
    assert {x.dtypes[0] for x in got} == set(BACKENDS.impls["triton"].dtypes)
    for x in got:
        K = x.args[4]
        assert (x.kwargs["BLOCK_M"], x.kwargs["BLOCK_K"], x.kwargs["ONE_PASS"]) == _triton_blocks(
            x.args[3], K, torch.device("cuda")
        )
        assert x.kwargs["HW_CAST"] and x.min_arch == 89
    assert {x.kwargs["ONE_PASS"] for x in got} == {True, False}  # both paths compiled


def test_fp8_launches_start_at_the_backends_capability(monkeypatch):
    from dmdr_fast.ops import _common
    from dmdr_fast.ops.attention_fp8 import BACKENDS

    fp8 = [x for x in triton_configs.launches(["attention"]) if torch.float8_e4m3fn in x.dtypes]
    assert fp8 and {x.min_arch for x in fp8} == {89}
    check = BACKENDS.impls["triton"].input_checks[1]
    for cap, refused in (((8, 6), True), ((8, 9), False)):
        monkeypatch.setattr(_common, "_capability", lambda index, cap=cap: cap)
        assert bool(check(device=torch.device("cuda", 0))) == refused


def test_parse_target_and_table():
    assert [triton_aot.parse_target(t) for t in ("sm_90", "sm90a", "80")] == [90, 90, 80]
    with pytest.raises(ValueError, match="not a CUDA target"):
        triton_aot.parse_target("hopper")
    launch = Launch("dmd_loss", "k", "cfg", (), group="g")
    results = [
        triton_aot.Result(launch, 80, True, 40, 0, 0, 0, 10**6, 4, 3),
        triton_aot.Result(launch, 90, True, 40, 0, 0, 0, 1024, 4, 3),
    ]
    assert triton_aot.group_failures(results) == ["sm_80 g"]  # its only configuration is too big
    table = triton_aot.format_table(results)
    assert "| dmd_loss.k | cfg | sm_90 | 4 | 3 | 40 | 0/0 | 0 | 1024 | ok |" in table
    assert "smem > limit" in table
    summary = triton_aot.format_summary([*results, triton_aot.Result(launch, 90, False)])
    assert "| dmd_loss.k | cfg | sm_90 | 1/2 | 40 | 0/0 | 1024 |" in summary
    assert "| dmd_loss.k | cfg | sm_80 | 1/1 | 40 | 0/0 | 1000000 |" in summary


def _ptxas_missing() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # no CUDA backend or no ptxas in this triton build
        return f"Triton's ptxas for sm_90 is not available ({exc})"
    return ""


@pytest.mark.skipif(bool(_ptxas_missing()), reason=_ptxas_missing() or "ptxas available")
def test_compiles_a_kernel_for_sm90_without_a_gpu():
    small = [
        x
        for x in triton_configs.launches(["dmd_loss"])
        if x.kernel == "_dmd_loss_reduce_kernel" and x.label.startswith("fp32 cfg B=64 D=1000 ")
    ]
    broken = Launch("dmd_loss", "_dmd_loss_reduce_kernel", "missing constexpr", small[0].args, {"ITERS": 1})
    ok, bad = triton_aot.run([small[0], broken], [90], jobs=1)
    assert ok.ok and ok.arch == 90 and ok.regs > 0 and ok.spill_stores == 0 and ok.shared >= 0, ok
    assert not bad.ok and bad.status == "FAILED" and bad.error
    assert Ptr(torch.float32).aligned
