"""reward_grad_combine as a registered custom op: torch.library.opcheck and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from tests.ops.test_reward_grad import make_inputs, poison

from dmdr_fast.ops import reward_grad_combine
from dmdr_fast.ops.reward_grad import BACKENDS


def _cpu_backends():
    out = []
    for name, impl in BACKENDS.impls.items():
        if not impl.not_supported_reasons("cpu", [torch.float32], device=torch.device("cpu")):
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("balanced", [True, False])
def test_opcheck(backend, balanced):
    d, r = make_inputs((3, 2, 5, 7))
    poison(r)
    args = (d, r, balanced, 0.7, 0.5, 2.0, 1e-12, backend)
    torch.library.opcheck(torch.ops.dmdr_fast.reward_grad_combine.default, args)


def test_opcheck_mixed_and_float64():
    d, r = make_inputs((2, 3, 4), torch.bfloat16, dtype_reward=torch.float32)
    torch.library.opcheck(
        torch.ops.dmdr_fast.reward_grad_combine.default, (d, r, True, 1.0, 1.0, math.inf, 1e-12, "torch")
    )
    d, r = make_inputs((2, 3, 4), torch.float32, dtype_reward=torch.float64)
    torch.library.opcheck(
        torch.ops.dmdr_fast.reward_grad_combine.default, (d, r, True, 1.0, 1.0, math.inf, 1e-12, "torch")
    )


def _step(x, g_dmd, g_reward):
    """Something to fuse around the op: the Trainer combines the gradients, then builds a loss."""
    g, stats = reward_grad_combine(g_dmd * 2.0, g_reward, mode="balanced", ratio=0.5, max_weight=2.0)
    loss = 0.5 * ((x - (x - g).detach()) ** 2).mean()
    return loss, stats.cosine.mean(), stats.nonfinite.sum()


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_matches_eager(compile_backend):
    """A compiled function calling the op (the op stays opaque) gives the eager results."""
    d, r = make_inputs((3, 4, 8, 8))
    poison(r)
    x = torch.randn(3, 4, 8, 8)
    compiled = torch.compile(_step, backend=compile_backend, fullgraph=False)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out_c = compiled(a, d, r)
    out_e = _step(b, d, r)
    out_c[0].backward()
    out_e[0].backward()
    for c, e in zip(out_c, out_e):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(a.grad, b.grad)
