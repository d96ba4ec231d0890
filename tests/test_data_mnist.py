"""Datasets: the real MNIST (when available), fake IDX files, resolve_root, synthetic."""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from fastcnn.data import DATASETS, Dataset, load_dataset, resolve_root
from fastcnn.data.idx import write_idx
from fastcnn.data.mnist import FILE_NAMES
from fastcnn.errors import DataError


@pytest.fixture(autouse=True)
def _never_the_internet(monkeypatch):
    """Should a test here ever try to download, it meets a closed local port."""
    monkeypatch.setenv("FASTCNN_MNIST_MIRROR", "http://127.0.0.1:9/")
    monkeypatch.setenv("FASTCNN_FASHION_MNIST_MIRROR", "http://127.0.0.1:9/")


# ---------------------------------------------------------------- real MNIST

def _real_root():
    """$FASTCNN_DATA (set by CI), else the shared folder beside the repository."""
    root = os.environ.get("FASTCNN_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return Path(root).expanduser()


REAL_ROOT = _real_root()
HAVE_MNIST = all((REAL_ROOT / "mnist" / n).is_file() or (REAL_ROOT / "mnist" / n[:-3]).is_file()
                 for n in FILE_NAMES)
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST files not found in {REAL_ROOT / 'mnist'} "
                                                        f"(set FASTCNN_DATA to a folder holding mnist/)")


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", root=REAL_ROOT, download=False, progress=False)


@needs_mnist
def test_real_mnist(mnist):
    ds = mnist
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.flags.c_contiguous
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9 and ds.y_test.max() == 9
    assert np.all(np.bincount(ds.y_train, minlength=10) > 5000)
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.class_names == [str(i) for i in range(10)]
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3
    assert ds.x_train.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert ds.x_train.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    # the well-known first labels
    assert ds.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert ds.y_test[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]


@needs_mnist
def test_real_mnist_subset(mnist):
    ds = load_dataset("mnist", root=REAL_ROOT, download=False, num_train=1000, num_test=100,
                      input_shape=(28, 28, 1), num_classes=10)
    assert ds.x_train.shape == (1000, 28, 28, 1) and ds.y_test.shape == (100,)
    np.testing.assert_array_equal(ds.x_train, mnist.x_train[:1000])
    np.testing.assert_array_equal(ds.y_test, mnist.y_test[:100])


@needs_mnist
def test_env_var_root(monkeypatch):
    monkeypatch.setenv("FASTCNN_DATA", str(REAL_ROOT))
    ds = load_dataset("mnist", download=False, num_train=10, num_test=10)
    assert ds.x_train.shape == (10, 28, 28, 1)


# ---------------------------------------------------------------- fake files

def make_fake(folder, n_train=12, n_test=6, compress=True, names=None):
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        fname = (names or {}).get(name, name if compress else name[:-3])
        write_idx(folder / fname, a, compress=compress)
    return arrays


def offline(name, root, **kw):
    return load_dataset(name, root=root, download=False, progress=False, **kw)


@pytest.mark.parametrize("compress", [True, False])
def test_fake_files_gzip_or_raw(tmp_path, compress):
    arrays = make_fake(tmp_path / "mnist", compress=compress)
    ds = offline("mnist", tmp_path)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (6, 28, 28, 1)
    np.testing.assert_allclose(ds.x_test[..., 0], (arrays["t10k-images-idx3-ubyte.gz"] / 255 - 0.1307) / 0.3081,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte.gz"])


def test_dotted_names_accepted(tmp_path):
    names = {n: n[:-3].replace("-idx", ".idx") for n in FILE_NAMES}  # train-images.idx3-ubyte
    make_fake(tmp_path / "mnist", names=names)
    assert len(offline("mnist", tmp_path).y_train) == 12


def test_a_folder_in_place_of_a_data_file_is_named(tmp_path):
    make_fake(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: is a folder, not the data file .*move it away"):
        offline("mnist", tmp_path)


def test_fashion_normalization(tmp_path):
    arrays = make_fake(tmp_path / "fashion-mnist")
    ds = offline("fashion-mnist", tmp_path)
    expected = (arrays["train-images-idx3-ubyte.gz"] / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.x_train[..., 0], expected, rtol=1e-5, atol=1e-5)
    assert ds.class_names[9] == "Ankle boot"


def test_num_train_num_test(tmp_path):
    make_fake(tmp_path / "mnist")
    ds = offline("mnist", tmp_path, num_train=5, num_test=2)
    full = offline("mnist", tmp_path)
    np.testing.assert_array_equal(ds.x_train, full.x_train[:5])
    np.testing.assert_array_equal(ds.y_test, full.y_test[:2])
    with pytest.raises(DataError, match="num_train=13"):
        offline("mnist", tmp_path, num_train=13)
    with pytest.raises(DataError, match="num_test"):
        offline("mnist", tmp_path, num_test=0)


def test_shape_and_class_mismatch(tmp_path):
    make_fake(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"\[28, 28, 1\].*\[32, 32, 3\]"):
        offline("mnist", tmp_path, input_shape=(32, 32, 3))
    with pytest.raises(DataError, match="10 classes.*num_classes is 5"):
        offline("mnist", tmp_path, num_classes=5)


def _corrupt(path, how):
    data = gzip.decompress(path.read_bytes())
    if how == "magic":
        data = b"\x00\x00\x08\x09" + data[4:]
    elif how == "body":
        data = data[:-10]
    path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize("how,message", [("magic", "magic number"), ("body", "truncated IDX file")])
def test_corrupt_existing_file(tmp_path, how, message):
    make_fake(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    _corrupt(bad, how)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", root=tmp_path, progress=False)  # download=True: present files are not replaced
    assert str(bad) in str(info.value)


def test_labels_swapped_for_images(tmp_path):
    make_fake(tmp_path / "mnist", names={"t10k-labels-idx1-ubyte.gz": "t10k-images-idx3-ubyte.gz",
                                         "t10k-images-idx3-ubyte.gz": "t10k-labels-idx1-ubyte.gz"})
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*magic number 2049, expected 2051"):
        offline("mnist", tmp_path)


def test_count_mismatch(tmp_path):
    make_fake(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DataError, match="12 images.*train-labels-idx1-ubyte.gz has 11 labels"):
        offline("mnist", tmp_path)


def test_label_out_of_range(tmp_path):
    make_fake(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.full(6, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 out of range"):
        offline("mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*mnist, fashion-mnist, synthetic"):
        load_dataset("cifar")
    assert DATASETS == ("mnist", "fashion-mnist", "synthetic", "cifar10", "folder", "npz")


# ---------------------------------------------------------------- resolve_root

def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTCNN_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_root() == tmp_path / "home" / ".cache" / "fastcnn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == tmp_path / "xdg" / "fastcnn"
    monkeypatch.setenv("FASTCNN_DATA", "~/data")
    assert resolve_root() == tmp_path / "home" / "data"
    assert resolve_root(None) == tmp_path / "home" / "data"
    assert resolve_root("~/explicit") == tmp_path / "home" / "explicit"
    assert resolve_root(tmp_path / "p") == tmp_path / "p"
    monkeypatch.setenv("FASTCNN_DATA", "")
    assert resolve_root() == tmp_path / "xdg" / "fastcnn"


def test_root_used_by_load_dataset(monkeypatch, tmp_path):
    make_fake(tmp_path / "env" / "mnist")
    make_fake(tmp_path / "arg" / "mnist", n_train=7)
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", download=False).y_train) == 12
    assert len(load_dataset("mnist", root=tmp_path / "arg", download=False).y_train) == 7


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_determinism():
    a = load_dataset("synthetic", input_shape=(12, 10, 3), num_classes=4, seed=3)
    b = load_dataset("synthetic", input_shape=[12, 10, 3], num_classes=4, seed=3)
    assert a.x_train.shape == (512, 12, 10, 3) and a.x_test.shape == (128, 12, 10, 3)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.x_train.flags.c_contiguous
    assert a.input_shape == (12, 10, 3) and a.num_classes == 4 and len(a.class_names) == 4
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-4
    counts = np.bincount(a.y_train, minlength=4)
    assert counts.max() - counts.min() <= 1
    assert set(np.unique(a.y_test)) == {0, 1, 2, 3}


def test_synthetic_seeds_differ_and_sizes():
    a = load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=3, seed=0)
    b = load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=3, seed=1)
    assert not np.array_equal(a.x_train, b.x_train)
    c = load_dataset("synthetic", input_shape=(8, 8, 1), num_classes=3, seed=0, num_train=50, num_test=7)
    assert c.x_train.shape == (50, 8, 8, 1) and c.x_test.shape == (7, 8, 8, 1)


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier (far weaker than a CNN) already does well."""
    ds = load_dataset("synthetic", input_shape=(16, 16, 1), num_classes=10, seed=0)
    means = np.stack([ds.x_train[ds.y_train == k].mean(0).ravel() for k in range(10)])
    d = ((ds.x_test.reshape(len(ds.x_test), -1)[:, None, :] - means[None]) ** 2).sum(-1)
    acc = float((d.argmin(1) == ds.y_test).mean())
    assert acc > 0.9
    # ...and it is not trivial: a single pixel does not give the class away
    assert float(np.mean(np.abs(np.corrcoef(ds.x_train[:, 0, 0, 0], ds.y_train)[0, 1]))) < 0.5


@pytest.mark.parametrize("kw,message", [
    (dict(num_classes=10), "input_shape"),
    (dict(input_shape=(8, 8, 1)), "num_classes"),
    (dict(input_shape=(8, 8), num_classes=3), "input_shape"),
    (dict(input_shape=(8, 0, 1), num_classes=3), "input_shape"),
    (dict(input_shape=(8, 8, 1), num_classes=1), "num_classes"),
    (dict(input_shape=(8, 8, 1), num_classes=3, num_train=0), "num_train"),
])
def test_synthetic_bad_arguments(kw, message):
    with pytest.raises(DataError, match=message):
        load_dataset("synthetic", **kw)
