import numpy as np
import pytest

import fastcnn
from fastcnn.kernels import loss as K
from fastcnn.kernels import reference as R
from fastcnn.losses import softmax_cross_entropy

from conftest import numerical_grad as central_differences

DTYPES = [np.float32, np.float64]


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) at x (float64)."""
    return central_differences(lambda: f(x), x, eps)


def kernel(logits, labels):
    d = np.full_like(logits, np.nan)
    loss = K.softmax_cross_entropy_kernel(logits, labels, d)
    return loss, d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 3), (64, 10), (7, 100)])
def test_kernel_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    loss, d = kernel(logits, labels)
    loss_ref, d_ref = R.softmax_cross_entropy(logits.astype(np.float64), labels)
    assert d.dtype == dtype
    t = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(loss_ref, rel=t["rtol"], abs=t["atol"])
    np.testing.assert_allclose(d, d_ref, **t)
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-6)


def test_gradient_check():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 5))
    labels = rng.integers(0, 5, 4)
    _, d = kernel(logits, labels)
    num = numerical_grad(lambda z: kernel(z, labels)[0], logits)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api(dtype):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((8, 4)).astype(dtype)
    labels = rng.integers(0, 4, 8)
    loss, d = fastcnn.softmax_cross_entropy(logits, labels)
    assert isinstance(loss, float)
    assert d.shape == logits.shape and d.dtype == dtype
    loss_ref, d_ref = R.softmax_cross_entropy(logits.astype(np.float64), labels)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    # any integer dtype for labels
    loss32, _ = softmax_cross_entropy(logits, labels.astype(np.int32))
    assert loss32 == loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_do_not_overflow(dtype):
    logits = np.array([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 0.0], [-1000.0, 1000.0, 999.0]], dtype=dtype)
    labels = np.array([0, 1, 2])
    loss, d = softmax_cross_entropy(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    expected = (0.0 + np.log(2.0) + (1.0 + np.log1p(np.exp(-1.0)))) / 3
    assert loss == pytest.approx(expected, rel=1e-5)
    # a confidently wrong prediction: loss ~ 2000 / 3 and still finite
    loss2, d2 = softmax_cross_entropy(np.array([[1000.0, -1000.0]], dtype=dtype), np.array([1]))
    assert loss2 == pytest.approx(2000.0, rel=1e-6)
    np.testing.assert_allclose(d2, [[1.0, -1.0]])


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 1, 2, 12]), r"value 12 at index 3 is outside \[0, 10\)"),
        (np.array([0, -1, 2, 3]), r"value -1 at index 1 is outside \[0, 10\)"),
        (np.array([0, 1, 2]), r"length 3 .* batch size 4"),
        (np.array([[0, 1, 2, 3]]), r"1-D"),
        (np.array([0.0, 1.0, 2.0, 3.0]), r"integer"),
    ],
)
def test_bad_labels(labels, match):
    logits = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(logits, labels)


@pytest.mark.parametrize(
    "logits, match",
    [
        (np.zeros(10, np.float32), r"2-D"),
        (np.zeros((4, 10), np.int64), r"float"),
        (np.zeros((0, 10), np.float32), r"empty"),
        ([[0.0, 1.0]], r"NumPy array"),
    ],
)
def test_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(logits, np.zeros(4, np.int64))


def test_non_contiguous_logits():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((10, 6))[:, ::2]
    labels = rng.integers(0, 3, 10)
    loss, d = softmax_cross_entropy(logits, labels)
    loss_ref, d_ref = R.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = (5 * rng.standard_normal((16, 10))).astype(dtype)
    labels = rng.integers(0, 10, 16)
    loss, d = softmax_cross_entropy(logits, labels)
    lt = torch.tensor(logits, requires_grad=True)
    lossT = torch.nn.functional.cross_entropy(lt, torch.tensor(labels))
    lossT.backward()
    t = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(lossT.item(), rel=t["rtol"])
    np.testing.assert_allclose(d, lt.grad.numpy(), **t)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_label_smoothing_matches_torch(eps, dtype, tol, rng):
    """Loss and gradient against torch.nn.functional.cross_entropy(label_smoothing=eps)."""
    torch = pytest.importorskip("torch")
    from fastcnn import softmax_cross_entropy

    logits = (rng.standard_normal((13, 7)) * 4).astype(dtype)
    labels = rng.integers(0, 7, 13)
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=eps)
    assert dlogits.dtype == dtype
    t = torch.tensor(logits.astype(np.float64), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.from_numpy(labels), label_smoothing=eps)
    ref.backward()
    assert abs(loss - ref.item()) <= tol * max(1.0, abs(ref.item()))
    np.testing.assert_allclose(dlogits, t.grad.numpy(), rtol=tol * 10, atol=tol)


def test_label_smoothing_central_differences(rng):
    """float64 central differences with a random upstream gradient on the smoothed loss."""
    from fastcnn import softmax_cross_entropy

    logits = rng.standard_normal((5, 4))
    labels = rng.integers(0, 4, 5)
    _, d = softmax_cross_entropy(logits, labels, label_smoothing=0.2)
    eps = 1e-6
    num = np.zeros_like(logits)
    for i in np.ndindex(*logits.shape):
        old = logits[i]
        logits[i] = old + eps
        plus = softmax_cross_entropy(logits, labels, label_smoothing=0.2)[0]
        logits[i] = old - eps
        minus = softmax_cross_entropy(logits, labels, label_smoothing=0.2)[0]
        logits[i] = old
        num[i] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)


def test_label_smoothing_zero_is_bit_identical_and_bad_values_refused(rng):
    from fastcnn import softmax_cross_entropy

    logits = rng.standard_normal((9, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 9)
    a, da = softmax_cross_entropy(logits, labels)
    b, db = softmax_cross_entropy(logits, labels, label_smoothing=0.0)
    assert a == b and da.tobytes() == db.tobytes()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            softmax_cross_entropy(logits, labels, label_smoothing=bad)
