"""Helpers shared by the tests."""

from __future__ import annotations

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``approx`` against ``ref`` in dB."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def assert_close_rel_to_torch(
    out: torch.Tensor,
    ref: torch.Tensor,
    pt: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 0.0,
    name: str = "",
) -> None:
    """flash-attention's tolerance rule: a kernel may be at most ``factor``× as wrong as PyTorch.

    ``ref`` is the float32/64 reference, ``pt`` the same reference computed in the low-precision
    dtype, ``out`` the kernel's result; all compared in float64.
    """
    out, ref, pt = out.double(), ref.double(), pt.double()
    err = (out - ref).abs().max().item()
    pt_err = (pt - ref).abs().max().item()
    bound = factor * pt_err + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {factor}×PyTorch error {pt_err:.3e} + atol {atol:.1e}"
    )


def assert_resume_is_exact(make_trainer, cfg, out_dir) -> None:
    """A run interrupted after 2 generator steps and resumed from ``out_dir`` ends with exactly the
    student of the uninterrupted run (``make_trainer(cfg, out_dir=None)`` builds a Trainer)."""
    full = make_trainer(cfg)
    full.fit(progress=False)
    part = make_trainer(cfg, out_dir)
    part.fit(max_steps=2, progress=False)
    resumed = make_trainer(cfg, out_dir)
    assert resumed.resume()
    resumed.fit(progress=False)
    for (n, a), b in zip(
        full.student.network.named_parameters(), resumed.student.network.parameters(), strict=True
    ):
        assert torch.equal(a, b), f"student {n} differs after resume"


def assert_close_tree(got, expected, rel: float, path: str = "") -> None:
    """Nested dicts / lists equal, their floats to ``rel`` (metrics recomputed under another thread
    count sum in another order); everything else exactly."""
    import math

    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            assert_close_tree(got[key], expected[key], rel, f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_close_tree(g, e, rel, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert math.isclose(got, expected, rel_tol=rel, abs_tol=1e-12), f"{path}: {got} vs {expected}"
    else:
        assert got == expected, f"{path}: {got!r} vs {expected!r}"
