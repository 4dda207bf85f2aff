# Typed stub of the compiled pybind11 module dmdr_fast._C (csrc/bindings/module.cpp).
#
# Tensors cross the boundary as raw addresses (``tensor.data_ptr()``, an int; 0 = null), so that
# _C never links libtorch (docs/architecture.md §5, the binding rule). The C++ side trusts its
# inputs: the ops in dmdr_fast.ops validate every argument before calling. ``dtype`` is the code
# of dmdr_fast.ops._common.dtype_code (csrc/include/dmdr_fast/dtype.h).

def build_info() -> dict[str, str | bool]:
    """What this module was compiled with: CUDA on/off, archs, compiler versions, OpenMP."""

def cuda_device_count() -> tuple[int, str]:
    """(count, reason): visible CUDA devices, and why there are none when count is 0."""

def cuda_device_capability(device: int) -> str:
    """Compute capability 'major.minor' of a device, or '' when unavailable."""

def dmd_loss_fwd_cpu(
    x0: int,
    x_t: int,
    t: int,
    v_fake: int,
    v_cond: int,
    v_uncond: int,
    g: int,
    norm: int,
    sumsq: int,
    loss: int,
    batch: int,
    numel: int,
    guidance: float,
    eps: float,
    dtype: int,
    num_threads: int,
) -> None:
    """Fused DMD loss forward on the CPU (releases the GIL); v_uncond=0 means no CFG.
    Writes g (B, D), norm (B,), sumsq (B,) and loss (1,)."""

def dmd_loss_workspace_bytes(batch: int, numel: int, device: int) -> int:
    """Device workspace in bytes that dmd_loss_fwd_cuda needs."""

def dmd_loss_fwd_cuda(
    x0: int,
    x_t: int,
    t: int,
    v_fake: int,
    v_cond: int,
    v_uncond: int,
    g: int,
    norm: int,
    sumsq: int,
    loss: int,
    batch: int,
    numel: int,
    guidance: float,
    eps: float,
    dtype: int,
    workspace: int,
    workspace_bytes: int,
    device: int,
    stream: int,
) -> None:
    """Fused DMD loss forward on a CUDA device (two launches on ``stream``, a cudaStream_t)."""

def reward_grad_fwd_cpu(
    g_dmd: int,
    g_reward: int,
    g: int,
    stats: int,
    nonfinite: int,
    batch: int,
    numel: int,
    balanced: bool,
    weight: float,
    ratio: float,
    max_weight: float,
    eps: float,
    dtype: int,
    num_threads: int,
) -> None:
    """Fused reward-gradient combination on the CPU (releases the GIL). Writes g (B, D), stats
    (4, B) float32 [dmd_norm, reward_norm, cosine, weight] and nonfinite (B,) int64."""

def reward_grad_workspace_bytes(batch: int, numel: int, device: int) -> int:
    """Device workspace in bytes that reward_grad_fwd_cuda needs."""

def reward_grad_fwd_cuda(
    g_dmd: int,
    g_reward: int,
    g: int,
    stats: int,
    nonfinite: int,
    batch: int,
    numel: int,
    balanced: bool,
    weight: float,
    ratio: float,
    max_weight: float,
    eps: float,
    dtype: int,
    workspace: int,
    workspace_bytes: int,
    device: int,
    stream: int,
) -> None:
    """Fused reward-gradient combination on a CUDA device (two launches on ``stream``)."""

def quantize_fp8_fwd_cpu(
    x: int,
    q: int,
    scale: int,
    rows: int,
    row_size: int,
    eps: float,
    amax_ub: float,
    dtype: int,
    fp8_dtype: int,
    num_threads: int,
) -> None:
    """Row-wise FP8 quantisation on the CPU (releases the GIL). Writes q (rows, row_size) fp8
    codes and scale (rows,) float32."""

def quantize_fp8_fwd_cuda(
    x: int,
    q: int,
    scale: int,
    rows: int,
    row_size: int,
    eps: float,
    amax_ub: float,
    dtype: int,
    fp8_dtype: int,
    device: int,
    stream: int,
) -> None:
    """Row-wise FP8 quantisation on a CUDA device (one launch on ``stream``, a cudaStream_t)."""
