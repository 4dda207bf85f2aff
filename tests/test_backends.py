"""Backend dispatch rules: explicit > use_backend() > DMDR_FAST_BACKEND > automatic."""

from __future__ import annotations

import pytest
import torch

import dmdr_fast
from dmdr_fast import backends, ops
from dmdr_fast._native import get_native
from dmdr_fast.ops.dmd_loss import BACKENDS

CPU = torch.device("cpu")


def _select(requested=None, dtypes=(torch.float32,)):
    return backends.select_backend(BACKENDS, requested, "cpu", list(dtypes), device=CPU).name


needs_native = pytest.mark.skipif(get_native() is None, reason="dmdr_fast._C not built")


@needs_native
def test_automatic_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DMDR_FAST_BACKEND", raising=False)
    assert _select() == "cpp"
    assert _select(dtypes=(torch.float64,)) == "torch"  # fused kernels refuse float64: silent fallback


def test_explicit_beats_context_beats_env(monkeypatch):
    monkeypatch.setenv("DMDR_FAST_BACKEND", "torch")
    assert _select() == "torch"
    with dmdr_fast.use_backend("triton"):
        assert _select() == "triton"
        assert _select("torch") == "torch"
        with dmdr_fast.use_backend(None):
            assert _select() == "torch"  # env again


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*choose one of"):
        _select("nope")
    with dmdr_fast.use_backend("sdpa"):  # a backend of other ops only: ignored for this op
        assert _select() in {"cpp", "torch"}


def test_explicit_refusal_lists_every_backend(monkeypatch):
    monkeypatch.delenv("DMDR_FAST_BACKEND", raising=False)
    with pytest.raises(backends.BackendUnavailableError) as info:
        _select("cuda")
    msg = str(info.value)
    assert "requested by argument backend=" in msg
    for name in ("torch", "cpp", "cuda", "triton"):
        assert f"  {name}: " in msg
    assert "runs on ['cuda'], not 'cpu'" in msg


def test_context_manager_refusal_raises(monkeypatch):
    monkeypatch.delenv("DMDR_FAST_BACKEND", raising=False)
    with dmdr_fast.use_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="use_backend"):
        _select()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = BACKENDS.impls["triton"].not_supported_reasons("cpu", [torch.float32], device=CPU)
    assert reasons and ("TRITON_INTERPRET=1" in reasons[0] or "not installed" in reasons[0])


def test_availability_table_covers_all_backends():
    rows = ops.availability_table()
    names = {(r["op"], r["backend"]) for r in rows}
    assert {("dmd_loss", b) for b in ("torch", "cpp", "cuda", "triton")} <= names
