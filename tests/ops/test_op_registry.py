"""The op registry of dmdr_fast.ops and the layer rule: backends.py knows no op, no module of the
lower layers imports a higher one, and every op's backends are an explicit table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import dmdr_fast
from dmdr_fast import ops
from dmdr_fast.backends import BackendImpl, OpBackends
from dmdr_fast.ops.attention import BACKENDS as ATTENTION
from dmdr_fast.ops.attention_fp8 import BACKENDS as ATTENTION_FP8
from dmdr_fast.ops.dmd_loss import BACKENDS as DMD_LOSS
from dmdr_fast.ops.quantize_fp8 import BACKENDS as QUANTIZE_FP8
from dmdr_fast.ops.reward_grad import BACKENDS as REWARD_GRAD

PKG = Path(dmdr_fast.__file__).parent
# Layer of each module (docs/architecture.md §1): a module may import only its own layer or lower.
LOWER = {"dmdr_fast._native": 0, "dmdr_fast._io": 0, "dmdr_fast._dtypes": 0, "dmdr_fast.backends": 1}


def _layer(module: str) -> int:
    if module in LOWER:
        return LOWER[module]
    if module == "dmdr_fast.ops" or module.startswith("dmdr_fast.ops."):
        return 2
    if module == "dmdr_fast._C":
        return 0
    return 3


def _imports(path: Path) -> set[str]:
    """Every dmdr_fast module imported by ``path``, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dmdr_fast")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmdr_fast"):
            if node.module == "dmdr_fast":  # `from dmdr_fast import ops` imports dmdr_fast.ops
                found |= {f"dmdr_fast.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


@pytest.mark.parametrize(
    "path", [PKG / "_native.py", PKG / "backends.py", *sorted((PKG / "ops").glob("*.py"))], ids=str
)
def test_no_module_imports_a_higher_layer(path: Path):
    module = "dmdr_fast." + ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
    higher = sorted(m for m in _imports(path) if _layer(m) > _layer(module))
    assert not higher, f"{module} imports higher layers: {higher}"


def test_registry_lists_every_op_table():
    assert dict(ops.OPS) == {
        "attention": ATTENTION,
        "attention_fp8": ATTENTION_FP8,
        "dmd_loss": DMD_LOSS,
        "quantize_fp8": QUANTIZE_FP8,
        "reward_grad_combine": REWARD_GRAD,
    }
    for name, table in ops.OPS.items():
        assert isinstance(table, OpBackends) and table.op == name
        assert all(isinstance(impl, BackendImpl) and impl.name == key for key, impl in table.impls.items())
    assert list(ops.get_backends("dmd_loss")) == ["torch", "cpp", "cuda", "triton"]
    assert list(ops.get_backends("quantize_fp8")) == ["torch", "cpp", "cuda", "triton"]
    assert list(ops.get_backends("attention")) == ["torch", "sdpa", "xformers", "triton"]
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        ops.get_backends("nope")


def test_availability_table_order_and_rows():
    rows = ops.availability_table()
    assert [r["op"] for r in rows] == sorted(r["op"] for r in rows)  # ops by name, stable within
    assert len(rows) == 2 * sum(len(t.impls) for t in ops.OPS.values())
    assert {r["status"] for r in rows if r["backend"] == "torch" and r["device"] == "cpu"} == {"yes"}
    # On the CUDA device type every backend, the reference too, is as available as CUDA itself.
    on_cuda = {r["status"] for r in rows if r["backend"] == "torch" and r["device"] == "cuda"}
    assert on_cuda == {"yes"} if torch.cuda.is_available() else all(s.startswith("no: ") for s in on_cuda)
    assert all(r["status"] == "-" for r in rows if r["backend"] == "cpp" and r["device"] == "cuda")


def test_table_rejects_bad_declarations():
    impl = DMD_LOSS.impls["torch"]
    with pytest.raises(ValueError, match="duplicate backend names"):
        OpBackends.build("x", [impl, impl], {})
    with pytest.raises(ValueError, match=r"priority for 'cpu' names unknown backends \['cpp'\]"):
        OpBackends.build("x", [impl], {"cpu": ("cpp", "torch")})
