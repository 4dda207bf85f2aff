"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before any Triton kernel module is imported (docs/architecture.md §6): on a
machine without a GPU the Triton backend then runs through Triton's interpreter on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Deterministic, quiet CPU runs: tests compare numbers, not speed.
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or "cuda_ext" in item.keywords:
            item.add_marker(skip)
