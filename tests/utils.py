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
