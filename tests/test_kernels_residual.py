"""The residual block's element-wise kernels (fastcnn/kernels/residual.py) against their NumPy
references (the unfused computation: np.add, then a ReLU or its mask), bit for bit: float32 and
float64, sizes around the chunk boundaries, NaN, infinities, signed zeros, in place, any thread count.

Also passes under NUMBA_DISABLE_JIT=1 (the kernels then run as Python loops); one test runs the
kernels that way in a subprocess and compares them with the compiled ones.
"""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from fastcnn.kernels import residual as K

# inf + -inf and NaN compares in the NumPy references.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [np.float32, np.float64]
SIZES = [1, 7, K.CHUNK - 1, K.CHUNK, K.CHUNK + 3, 2 * K.CHUNK + 5]


def special(rng, n, dtype):
    """Normal values with exact zeros of both signs, NaN, infinities and ties that cancel to 0."""
    a = rng.standard_normal(n).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    a[::11], b[::13] = 0, -0.0
    a[3::17] = np.nan
    b[5::19] = np.inf
    a[6::23] = -np.inf
    b[8::29] = -a[8::29]  # a + b == 0 exactly
    return a, b


def same_bits(got, want):
    """Bit for bit, signed zeros included; NaN where the other has NaN (a NaN's sign and payload, as
    for any IEEE addition of two NaNs, depend on the operand order the compiler picks)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(got)
    np.testing.assert_array_equal(nan, np.isnan(want))
    g, w = np.where(nan, 0, got), np.where(nan, 0, want)
    assert g.tobytes() == w.tobytes(), np.flatnonzero(g.view(np.uint8) != w.view(np.uint8))[:10]


def run_all(a, b, dy, y):
    """Every kernel's output, from fresh arrays."""
    out = {}
    for name, args in (("add_relu_forward", (a, b)), ("add_forward", (a, b)), ("relu_mask_backward", (y, dy)),
                       ("add_relu_mask_backward", (a, b, y))):
        o = np.full_like(a, 7)
        getattr(K, name)(*args, o)
        out[name] = o
    return out


def references(a, b, dy, y):
    return {"add_relu_forward": K.add_relu_forward_reference(a, b), "add_forward": K.add_forward_reference(a, b),
            "relu_mask_backward": K.relu_mask_backward_reference(y, dy),
            "add_relu_mask_backward": K.add_relu_mask_backward_reference(a, b, y)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_kernels_match_the_unfused_numpy_computation(dtype, n):
    rng = np.random.default_rng(n)
    a, b = special(rng, n, dtype)
    dy = rng.standard_normal(n).astype(dtype)
    y = K.add_relu_forward_reference(a, b)  # a block's output: the mask the backward reads
    want = references(a, b, dy, y)
    got = run_all(a, b, dy, y)
    for name in want:
        same_bits(got[name], want[name])
    # The unfused computation spelled out: the sum, then torch's relu and threshold_backward.
    z = a + b
    same_bits(got["add_forward"], z)
    same_bits(got["add_relu_forward"], np.where(np.isnan(z) | (z > 0), z, dtype(0)))
    same_bits(got["relu_mask_backward"], np.where(np.isnan(y) | (y > 0), dy, dtype(0)))


def test_nan_semantics_as_pytorch():
    torch = pytest.importorskip("torch")
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    a = np.array([nan, 1, -1, 0, -0.0, 2, inf, -inf, 3], np.float32)
    b = np.array([1, nan, 1, -0.0, -0.0, -3, -inf, 1, 0], np.float32)
    dy = np.arange(1, 10, dtype=np.float32)
    y = np.empty_like(a)
    K.add_relu_forward(a, b, y)
    ta = torch.from_numpy(a).requires_grad_()
    ty = torch.relu(ta + torch.from_numpy(b))
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(y, ty.detach().numpy())  # NaN where torch has NaN (the sign of 0 aside)
    g = np.empty_like(a)
    K.relu_mask_backward(y, dy, g)
    np.testing.assert_array_equal(g, ta.grad.numpy())  # NaN sums pass the gradient; 0 and negative sums stop it
    assert np.isnan(y[:2]).all() and g[0] == 1 and g[3] == 0 and g[4] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_stays_float32_and_any_shape(dtype):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5, 4, 6)).astype(dtype)
    b = rng.standard_normal((3, 5, 4, 6)).astype(dtype)
    out = np.empty_like(a)
    K.add_forward(a, b, out)
    same_bits(out, a + b)  # float32 + float32 rounded to float32, no float64 intermediate
    if dtype == np.float32:
        wide = (a.astype(np.float64) + b.astype(np.float64)).astype(np.float32)
        same_bits(out, wide)  # (the same here: one addition rounds once either way)


def test_output_may_be_an_input():
    rng = np.random.default_rng(4)
    a, b = special(rng, K.CHUNK + 9, np.float32)
    y = K.add_relu_forward_reference(a, b)
    want = references(a, b, b, y)
    for name, args, alias in (("add_relu_forward", (a, b), 0), ("add_forward", (a, b), 1),
                              ("relu_mask_backward", (y, b), 1), ("add_relu_mask_backward", (a, b, y), 0)):
        args = [x.copy() for x in args]
        getattr(K, name)(*args, args[alias])
        same_bits(args[alias], want[name])


def test_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(5)
    n = 5 * K.CHUNK + 123
    a, b = special(rng, n, np.float32)
    dy = rng.standard_normal(n).astype(np.float32)
    y = K.add_relu_forward_reference(a, b)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append(run_all(a, b, dy, y))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for name in results[0]:
            same_bits(other[name], results[0][name])


_DISABLE_JIT_SCRIPT = textwrap.dedent("""
    import sys
    import numba
    import numpy as np
    from fastcnn.kernels import residual as K
    assert numba.config.DISABLE_JIT
    rng = np.random.default_rng(6)
    n = K.CHUNK + 17
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    a[::7] = np.nan
    b[::5] = -a[::5]
    dy = rng.standard_normal(n).astype(np.float32)
    y = K.add_relu_forward_reference(a, b)
    out = {}
    for name, args in (("add_relu_forward", (a, b)), ("add_forward", (a, b)), ("relu_mask_backward", (y, dy)),
                       ("add_relu_mask_backward", (a, b, y))):
        o = np.empty_like(a)
        getattr(K, name)(*args, o)
        out[name] = o
    np.savez(sys.argv[1], a=a, b=b, dy=dy, y=y, **out)
""")


def test_disable_jit_gives_the_compiled_results(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_DISABLE_JIT_SCRIPT)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.npz")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as f:
        saved = {k: f[k] for k in f.files}
    compiled = run_all(saved["a"], saved["b"], saved["dy"], saved["y"])
    for name, got in compiled.items():
        same_bits(saved[name], got)
