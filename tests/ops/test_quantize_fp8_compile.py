"""quantize_fp8 as a registered custom op: torch.library.opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from tests.ops.test_quantize_fp8 import assert_bit_exact, make_input

from dmdr_fast.ops import quantize_fp8
from dmdr_fast.ops._common import FP8_DTYPES
from dmdr_fast.ops.quantize_fp8 import BACKENDS


def _cpu_backends():
    out = []
    for name, impl in BACKENDS.impls.items():
        if not impl.not_supported_reasons("cpu", [torch.float32], device=torch.device("cpu")):
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_opcheck(backend, fp8_dtype):
    x = make_input((3, 5, 7), torch.float32)
    torch.library.opcheck(
        torch.ops.dmdr_fast.quantize_fp8.default, (x, fp8_dtype, 1e-12, float("inf"), backend)
    )


def test_compile_fullgraph_matches_eager():
    """A compiled FP8-linear-like function (quantise, then torch._scaled_mm-style dequantised
    matmul) traces the op as one opaque node, without graph breaks, and matches eager."""
    x = make_input((16, 32), torch.float32)
    w = make_input((8, 32), torch.float32, seed=1)

    def fp8_linear(x, w):
        qx, sx = quantize_fp8(x * 2.0)
        qw, sw = quantize_fp8(w)
        return (qx.float() * sx) @ (qw.float() * sw).t(), qx

    compiled = torch.compile(fp8_linear, backend="aot_eager", fullgraph=True)
    out_c, q_c = compiled(x, w)
    out_e, q_e = fp8_linear(x, w)
    assert torch.equal(out_c, out_e)
    assert torch.equal(q_c.view(torch.uint8), q_e.view(torch.uint8))


@pytest.mark.slow
def test_compile_inductor():
    x = make_input((4, 3, 40), torch.bfloat16)
    compiled = torch.compile(lambda a: quantize_fp8(a, torch.float8_e5m2))
    assert_bit_exact(*compiled(x), *quantize_fp8(x, torch.float8_e5m2))
