"""What the compiled module reports about itself."""

from __future__ import annotations

import pathlib

import pytest

from dmdr_fast._native import get_native

native = get_native()
pytestmark = pytest.mark.skipif(native is None, reason="dmdr_fast._C not built")


def test_build_info_fields():
    info = native.build_info()
    for key in ("version", "cuda", "cuda_archs", "cuda_compiler", "cxx_compiler", "openmp", "build_type"):
        assert key in info
    assert info["openmp"].startswith("OpenMP"), "CPU kernels must be built with OpenMP"


def test_cuda_device_count_reports_a_reason_when_zero():
    count, reason = native.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert reason, "a machine without devices must say why"


def test_cuda_build_contains_sm90a_code():
    info = native.build_info()
    if not info["cuda"]:
        pytest.skip("built without CUDA")
    assert "90a" in info["cuda_archs"]
    blob = pathlib.Path(native.__file__).read_bytes()
    assert b"sm_90a" in blob, "no sm_90a cubin/PTX embedded in _C"
