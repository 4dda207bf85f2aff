"""Importing dmdr_fast must work without a GPU, Triton or the compiled _C, and never touch CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_import_is_lean_and_does_not_initialise_cuda():
    r = _run(
        """
        import sys, torch
        import dmdr_fast
        import dmdr_fast.ops
        assert "triton" not in sys.modules, "triton imported eagerly"
        assert "dmdr_fast._C" not in sys.modules, "_C imported eagerly"
        assert "dmdr_fast.kernels.dmd_loss" not in sys.modules
        assert not torch.cuda.is_initialized(), "CUDA initialised at import"
        assert dmdr_fast.Trainer.__name__ == "Trainer"  # the public API loads lazily
        import dmdr_fast.models, dmdr_fast.algo, dmdr_fast.eval
        assert not torch.cuda.is_initialized(), "CUDA initialised by the training stack's import"
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_works_without_native_module_and_triton():
    """Block dmdr_fast._C and triton: the op still runs (torch backend) and explains what is missing."""
    r = _run(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "dmdr_fast._C" or name == "triton" or name.startswith("triton."):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import torch, dmdr_fast
        from dmdr_fast.ops import availability_table, dmd_loss
        x = torch.randn(2, 3, 4)
        loss = dmd_loss(x, x, torch.rand(2), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
        assert loss.dim() == 0
        try:
            dmd_loss(x, x, torch.rand(2), x, x, backend="cpp")
        except dmdr_fast.BackendUnavailableError as e:
            msg = str(e)
            assert "cpp" in msg and "could not be imported" in msg and "pip install" in msg, msg
            assert "torch: available" in msg, msg
        else:
            raise AssertionError("cpp should be unavailable")
        rows = availability_table()
        assert any(r["backend"] == "triton" and r["status"].startswith("no: triton") for r in rows), rows
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.strip().endswith("ok")
