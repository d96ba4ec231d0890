"""Tell Numba's LLVM to use the host's full vector width.

LLVM tunes AVX-512 CPUs (Skylake-X and later, Zen 4) to prefer 256-bit
vectors. For our kernels, whose inner loops run over 32-64 contiguous
channels, 512-bit vectors were measurably faster, so, on a CPU with AVX-512F,
we pass the host's own feature list plus ``-prefer-256-bit`` as
NUMBA_CPU_FEATURES. Detected at run time, never hard-coded: another machine
gets its own features. Must run before numba is imported; a value the user
set already wins. Opt-in (FASTCNN_CPU_TUNING=1) until it is measured to help:
with the first conv kernels it made no difference (conv2 forward 140 vs 135 GFLOP/s).
"""
import os


def configure_numba_cpu():
    """Set NUMBA_CPU_FEATURES for this process if appropriate. Returns the value used, or None."""
    if os.environ.get("FASTCNN_CPU_TUNING", "0") != "1" or "NUMBA_CPU_FEATURES" in os.environ:
        return os.environ.get("NUMBA_CPU_FEATURES")
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001 - tuning is an optimization, never a reason to fail
        return None
    if "+avx512f" not in features.split(","):
        return None
    value = features + ",-prefer-256-bit"
    os.environ["NUMBA_CPU_FEATURES"] = value
    return value
