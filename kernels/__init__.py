"""Triton kernels of dmdr_fast (shipped as ``dmdr_fast.kernels``).

Modules here import ``triton`` at import time; ``dmdr_fast.ops`` imports them lazily, only when
the Triton backend is actually used, so that ``import dmdr_fast`` never needs Triton.
"""
