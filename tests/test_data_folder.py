"""The image-folder dataset (needs Pillow): tiny PNG/JPEG files written here."""
import builtins

import numpy as np
import pytest

from fastcnn.data import folder as F
from fastcnn.data import load_dataset
from fastcnn.errors import DataError

Image = pytest.importorskip("PIL.Image")


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_folder(root, classes=("cat", "dog"), per_class=5, size=(4, 6), seed=0, ext=".png"):
    """root/<class>/<i>.png RGB images; returns {path name: uint8 array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        for i in range(per_class):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            png(root / c / f"{i:02d}{ext}", a)
            written[f"{c}/{i:02d}{ext}"] = a
    return written


def load(path, **kw):
    kw.setdefault("input_shape", (4, 6, 3))
    return load_dataset("folder", path=path, **kw)


def test_train_test_folders(tmp_path):
    tr = make_folder(tmp_path / "train", classes=("b", "a", "c"), per_class=3)
    te = make_folder(tmp_path / "test", classes=("c", "a"), per_class=2, seed=1)
    (tmp_path / "train" / "a" / "notes.txt").write_text("ignored")
    ds = load(tmp_path, num_classes=3)
    assert ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.x_train.shape == (9, 4, 6, 3) and ds.x_test.shape == (4, 4, 6, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.y_test.tolist() == [0, 0, 2, 2]
    raw = np.stack([tr[k] for k in sorted(tr)]) / 255.0   # a/00, a/01, ..., c/02: the loading order
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(ds.x_train, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    raw_te = np.stack([te[k] for k in sorted(te)]) / 255.0
    np.testing.assert_allclose(ds.x_test, (raw_te - mean) / std, rtol=1e-5, atol=1e-5)


def test_holdout_without_splits(tmp_path):
    make_folder(tmp_path, per_class=10, ext=".PNG")
    a = load(tmp_path)
    b = load(tmp_path, seed=5)                      # the hold-out does not depend on the run's seed
    assert a.x_train.shape[0] == 16 and a.x_test.shape[0] == 4
    assert np.bincount(a.y_test).tolist() == [2, 2]  # 20% of each class
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    # the held-out images are not in the training split
    tr = {x.tobytes() for x in a.x_train}
    assert not any(x.tobytes() in tr for x in a.x_test)


def test_grayscale_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    png(tmp_path / "train" / "x" / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    png(tmp_path / "train" / "x" / "1.jpg", rng.integers(0, 256, (5, 9), dtype=np.uint8))
    png(tmp_path / "train" / "y" / "0.png", rng.integers(0, 256, (4, 4, 4), dtype=np.uint8))  # RGBA
    png(tmp_path / "train" / "y" / "1.jpeg", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    png(tmp_path / "test" / "y" / "0.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    ds = load(tmp_path, input_shape=(4, 4, 1), resize=True)
    assert ds.x_train.shape == (4, 4, 4, 1) and ds.x_test.shape == (1, 4, 4, 1)
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.y_test.tolist() == [1]
    assert len(ds.mean) == 1
    np.testing.assert_allclose(ds.x_train.mean(), 0, atol=1e-5)
    rgb = load(tmp_path, input_shape=(6, 5, 3), resize=True)
    assert rgb.x_train.shape == (4, 6, 5, 3)


def test_size_mismatch_without_resize(tmp_path):
    make_folder(tmp_path, per_class=3)
    png(tmp_path / "dog" / "big.png", np.zeros((7, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"big.png: image is 7x6 pixels.*needs 4x6.*data.resize") as info:
        load(tmp_path)
    assert str(tmp_path / "dog" / "big.png") in str(info.value)


def test_unreadable_image(tmp_path):
    make_folder(tmp_path, per_class=3)
    bad = tmp_path / "cat" / "zz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read the image") as info:
        load(tmp_path)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("setup,message", [
    ("empty", "no class sub-folders"),
    ("empty_class", "class folder holds no images"),
    ("unknown_test_class", "'fish' is not a training class"),
    ("too_few", "too few images to hold out"),
])
def test_bad_layouts(tmp_path, setup, message):
    if setup == "empty_class":
        make_folder(tmp_path)
        (tmp_path / "emu").mkdir()
    elif setup == "unknown_test_class":
        make_folder(tmp_path / "train")
        make_folder(tmp_path / "test", classes=("fish",))
    elif setup == "too_few":
        make_folder(tmp_path, per_class=2)
    with pytest.raises(DataError, match=message) as info:
        load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_arguments(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("folder", input_shape=(4, 6, 3))
    with pytest.raises(DataError, match="folder not found"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match="input_shape"):
        load(tmp_path, input_shape=None)
    with pytest.raises(DataError, match="has 2 channels"):
        load(tmp_path, input_shape=(4, 6, 2))
    with pytest.raises(DataError, match="2 class folders.*num_classes is 10"):
        load(tmp_path, num_classes=10)


def test_pillow_missing(tmp_path, monkeypatch):
    make_folder(tmp_path)
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DataError, match=r"pip install 'fastcnn\[images\]'"):
        F.load_image_folder(tmp_path, (4, 6, 3))
