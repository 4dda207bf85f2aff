# User-facing build options (also settable from pip: -C cmake.define.NAME=VALUE or the env vars
# DMDR_FAST_CUDA / DMDR_FAST_CUDA_ARCHS, see pyproject.toml).
set(DMDR_FAST_CUDA
    "AUTO"
    CACHE STRING "Build the CUDA kernels: AUTO (if nvcc is found), ON (required) or OFF")
set_property(CACHE DMDR_FAST_CUDA PROPERTY STRINGS AUTO ON OFF)
# sm_90a unlocks Hopper-only instructions; 80 (PTX + SASS) keeps the wheel usable on Ampere and,
# through PTX JIT, on newer GPUs.
set(DMDR_FAST_CUDA_ARCHS
    "90a;80"
    CACHE STRING "CUDA architectures (CMAKE_CUDA_ARCHITECTURES syntax)")
