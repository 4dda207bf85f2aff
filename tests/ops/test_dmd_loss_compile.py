"""dmd_loss as a registered custom op: torch.library.opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from tests.ops.test_dmd_loss import make_inputs

from dmdr_fast.ops import dmd_loss
from dmdr_fast.ops.dmd_loss import BACKENDS


def _cpu_backends():
    out = []
    for name, impl in BACKENDS.impls.items():
        if not impl.not_supported_reasons("cpu", [torch.float32], device=torch.device("cpu")):
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("uncond", [True, False])
def test_opcheck(backend, uncond):
    x0, x_t, t, vf, vc, vu = make_inputs((3, 2, 5, 7), torch.float32, uncond)
    x0.requires_grad_(True)
    torch.library.opcheck(torch.ops.dmdr_fast.dmd_loss.default, (x0, x_t, t, vf, vc, vu, 2.0, 1e-8, backend))


def test_compile_matches_eager():
    """A compiled function calling the op (the op stays opaque) gives the eager loss and gradient."""
    x0, x_t, t, vf, vc, vu = make_inputs((3, 4, 8, 8), torch.float32)

    def step(x0, x_t, t, vf, vc, vu):
        y = x0 * 2.0 - 1.0  # something to fuse around the op
        return dmd_loss(y, x_t, t, vf, vc, vu, guidance=2.0) * 3.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    a = x0.clone().requires_grad_(True)
    b = x0.clone().requires_grad_(True)
    loss_c = compiled(a, x_t, t, vf, vc, vu)
    loss_e = step(b, x_t, t, vf, vc, vu)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
def test_compile_inductor():
    x0, x_t, t, vf, vc, vu = make_inputs((2, 3, 8, 8), torch.float32)
    compiled = torch.compile(lambda *a: dmd_loss(*a, guidance=2.0))
    torch.testing.assert_close(
        compiled(x0, x_t, t, vf, vc, vu), dmd_loss(x0, x_t, t, vf, vc, vu, guidance=2.0)
    )
