"""The npz dataset: good files, standardization, and every corrupt case naming the file and key."""
import numpy as np
import pytest

from fastcnn.data import load_dataset
from fastcnn.data.arrays import channel_stats, standardize
from fastcnn.errors import DataError


def arrays(n_train=20, n_test=6, shape=(5, 4, 3), dtype=np.uint8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        x_tr = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
        x_te = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    else:
        x_tr = (rng.standard_normal((n_train, *shape)) * 3 + 1).astype(dtype)
        x_te = (rng.standard_normal((n_test, *shape)) * 3 + 1).astype(dtype)
    y_tr = np.arange(n_train) % k
    y_te = np.arange(n_test) % k
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


def save(tmp_path, a, name="data.npz"):
    path = tmp_path / name
    np.savez(path, **a)
    return path


def load(path, **kw):
    return load_dataset("npz", path=path, **kw)


def test_uint8_nhwc(tmp_path):
    a = arrays()
    ds = load(save(tmp_path, a), input_shape=(5, 4, 3))
    assert ds.name == "npz" and ds.x_train.shape == (20, 5, 4, 3) and ds.x_test.shape == (6, 5, 4, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.x_train.flags.c_contiguous
    assert ds.num_classes == 3 and ds.class_names == ["0", "1", "2"] and ds.input_shape == (5, 4, 3)
    v = a["x_train"] / 255.0
    mean, std = v.mean(axis=(0, 1, 2)), v.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(ds.std, std, rtol=1e-10)
    np.testing.assert_allclose(ds.x_train, (v - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (a["x_test"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, a["y_test"])


def test_float_nhw_and_num_classes(tmp_path):
    a = arrays(shape=(6, 6), dtype=np.float64)
    a["class_names"] = np.array(["a", "b", "c", "d"])
    ds = load(save(tmp_path, a), num_classes=4)        # K from the model; class 3 is never seen
    assert ds.x_train.shape == (20, 6, 6, 1) and ds.num_classes == 4 and ds.class_names == ["a", "b", "c", "d"]
    x = a["x_train"]
    np.testing.assert_allclose(ds.x_train[..., 0], (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-5)
    sub = load(save(tmp_path, a), num_classes=4, num_train=5, num_test=2)
    np.testing.assert_array_equal(sub.x_train, ds.x_train[:5])
    assert sub.y_test.shape == (2,)
    with pytest.raises(DataError, match="num_test=7"):
        load(save(tmp_path, a), num_classes=4, num_test=7)


def test_stats_helpers_constant_channel():
    x = np.zeros((3, 2, 2, 2), np.uint8)
    x[..., 1] = 255
    mean, std = channel_stats(x, 1 / 255)
    np.testing.assert_allclose(mean, [0, 1])
    np.testing.assert_allclose(std, [1, 1])               # no spread: std 1, no division by zero
    np.testing.assert_allclose(standardize(x, mean, std, 1 / 255), 0)


def _bad(a, key, value):
    a = dict(a)
    if value is None:
        del a[key]
    else:
        a[key] = value
    return a


@pytest.mark.parametrize("key,value,message", [
    ("y_test", None, "missing key 'y_test'"),
    ("x_train", np.zeros((0, 5, 4, 3), np.uint8), "x_train holds no images"),
    ("x_train", np.zeros((20, 5), np.uint8), r"x_train has shape \[20, 5\]"),
    ("x_train", np.zeros((20, 5, 4, 3), np.int32), "x_train has dtype int32"),
    ("x_test", np.zeros((6, 5, 4, 1), np.uint8), r"x_test has images of shape \[5, 4, 1\]"),
    ("x_test", np.zeros((6, 5, 4, 3), np.float32), "x_test has dtype float32 but x_train uint8"),
    ("y_train", np.zeros(19, np.int64), "y_train has 19 labels but x_train has 20"),
    ("y_train", np.zeros((20, 1), np.int64), r"y_train has shape \[20, 1\]"),
    ("y_test", np.zeros(6, np.float32), "y_test has dtype float32"),
    ("y_test", np.array([0, 1, -1, 0, 1, 2]), "y_test holds a negative label"),
    ("class_names", np.array(["a", "b"]), "class_names must be 3 strings"),
])
def test_bad_arrays_name_the_key(tmp_path, key, value, message):
    path = save(tmp_path, _bad(arrays(), key, value))
    with pytest.raises(DataError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_nan_values(tmp_path):
    a = arrays(dtype=np.float32)
    a["x_train"][7, 1, 1, 0] = np.nan
    with pytest.raises(DataError, match="x_train holds NaN or infinite values \\(first in image 7\\)"):
        load(save(tmp_path, a))
    a = arrays(dtype=np.float32)
    a["x_test"][2, 0, 0, 2] = np.inf
    with pytest.raises(DataError, match="x_test holds NaN"):
        load(save(tmp_path, a))


def test_object_arrays_are_never_unpickled(tmp_path):
    a = arrays()
    a["y_train"] = np.array([0] * 20, dtype=object)
    path = save(tmp_path, a)
    with pytest.raises(DataError, match="y_train is an object array.*never") as info:
        load(path)
    assert str(path) in str(info.value)


def test_model_mismatch(tmp_path):
    path = save(tmp_path, arrays())
    with pytest.raises(DataError, match=r"x_train has images of shape \[5, 4, 3\].*input_shape is \[5, 4, 1\]"):
        load(path, input_shape=(5, 4, 1))
    with pytest.raises(DataError, match="y_train holds label 2.*num_classes is 2"):
        load(path, num_classes=2)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("npz")
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="is a folder"):
        load(tmp_path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load(junk)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load(single)
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled data"):
        load(pickled)
