"""CIFAR-10 (binary version): small files in the real format, written here; download and
extraction of a small archive served from 127.0.0.1 (never the internet)."""
import hashlib
import io
import os
import socket
import tarfile

import numpy as np
import pytest

from fastcnn.data import cifar10 as C
from fastcnn.data import load_dataset
from fastcnn.errors import DataError

from conftest import MirrorHandler, serve_files

COUNTS = (3, 2, 4, 1, 2)  # records per training batch
N_TEST = 5


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("FASTCNN_CIFAR10_MIRROR", "http://127.0.0.1:9/")  # should a test ever download


def records(n, seed):
    """(raw bytes of n records, labels, images NHWC uint8)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # R, G, B planes, row-major
    raw = np.concatenate([labels[:, None], planes.reshape(n, 3072)], axis=1).tobytes()
    return raw, labels.astype(np.int64), planes.transpose(0, 2, 3, 1)


def make_batches(folder, meta=True):
    """Write the six batch files (and batches.meta.txt); return (x_train, y_train, x_test, y_test) raw."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, (name, n) in enumerate(zip(C.TRAIN_FILES, COUNTS)):
        raw, y, x = records(n, seed=i)
        (folder / name).write_bytes(raw)
        xs.append(x)
        ys.append(y)
    raw, y_te, x_te = records(N_TEST, seed=99)
    (folder / C.TEST_FILE).write_bytes(raw)
    if meta:
        (folder / C.META_FILE).write_text("\n".join(f"name{i}" for i in range(10)) + "\n\n")
    return np.concatenate(xs), np.concatenate(ys), x_te, y_te


def make_archive(src, path, extra=()):
    """A tar.gz of src/ under cifar-10-batches-bin/ (plus ``extra`` (name, bytes) members); its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, arcname=f"{C.BATCHES_DIR}/{p.name}")
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def expected(x):
    mean = np.array(C.MEAN, np.float64)
    std = np.array(C.STD, np.float64)
    return (x / 255.0 - mean) / std


def offline(root, **kw):
    return load_dataset("cifar10", root=root, download=False, progress=False, **kw)


def test_reads_the_binary_format(tmp_path):
    x_tr, y_tr, x_te, y_te = make_batches(tmp_path / "cifar10" / C.BATCHES_DIR)
    ds = offline(tmp_path, input_shape=(32, 32, 3), num_classes=10)
    n = sum(COUNTS)
    assert ds.x_train.shape == (n, 32, 32, 3) and ds.x_test.shape == (N_TEST, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    np.testing.assert_allclose(ds.x_train, expected(x_tr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, expected(x_te), rtol=1e-5, atol=1e-5)
    assert ds.class_names == [f"name{i}" for i in range(10)] and ds.num_classes == 10
    assert ds.input_shape == (32, 32, 3) and ds.mean == C.MEAN and ds.std == C.STD


def test_channel_layout(tmp_path):
    """Byte 1 + c*1024 + r*32 + col of a record is pixel (r, col) of channel c (R, G, B)."""
    folder = tmp_path / "cifar10" / C.BATCHES_DIR
    make_batches(folder)
    rec = bytearray(C.RECORD_BYTES)
    rec[0] = 7
    rec[1 + 0 * 1024 + 1 * 32 + 2] = 255   # red at row 1, col 2
    rec[1 + 2 * 1024 + 31 * 32 + 0] = 255  # blue at row 31, col 0
    (folder / C.TEST_FILE).write_bytes(bytes(rec))
    ds = offline(tmp_path)
    top = (np.array([255, 0, 0]) / 255.0 - C.MEAN) / C.STD
    np.testing.assert_allclose(ds.x_test[0, 1, 2], top.astype(np.float32), rtol=1e-5)
    assert ds.x_test[0, 31, 0, 2] == pytest.approx((1 - C.MEAN[2]) / C.STD[2], rel=1e-5)
    assert ds.y_test.tolist() == [7]


def test_meta_fallback_and_subsets(tmp_path):
    x_tr, y_tr, _, _ = make_batches(tmp_path / "cifar10" / C.BATCHES_DIR, meta=False)
    ds = offline(tmp_path, num_train=7, num_test=2)  # 7 spans three batch files
    assert ds.class_names == list(C.CLASS_NAMES)
    assert ds.x_train.shape == (7, 32, 32, 3) and ds.y_test.shape == (2,)
    np.testing.assert_array_equal(ds.y_train, y_tr[:7])
    np.testing.assert_allclose(ds.x_train, expected(x_tr[:7]), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="num_train=13"):
        offline(tmp_path, num_train=13)


def test_model_mismatch(tmp_path):
    make_batches(tmp_path / "cifar10" / C.BATCHES_DIR)
    with pytest.raises(DataError, match=r"\[32, 32, 3\].*\[28, 28, 1\]"):
        offline(tmp_path, input_shape=(28, 28, 1))
    with pytest.raises(DataError, match="10 classes.*num_classes is 5"):
        offline(tmp_path, num_classes=5)


@pytest.mark.parametrize("data,message", [
    (b"\x00" * (C.RECORD_BYTES * 2 - 1), "not a positive multiple of 3073"),
    (b"", "not a positive multiple of 3073"),
    (b"\x0a" + b"\x00" * (C.RECORD_BYTES - 1), "label 10 out of range in record 0"),
])
def test_corrupt_batch(tmp_path, data, message):
    folder = tmp_path / "cifar10" / C.BATCHES_DIR
    make_batches(folder)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", root=tmp_path, progress=False)  # present files are never replaced
    assert str(bad) in str(info.value)


def test_missing_offline_names_files_folder_and_url(tmp_path):
    folder = tmp_path / "cifar10" / C.BATCHES_DIR
    make_batches(folder)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=tmp_path, download=False, mirrors=["https://www.cs.toronto.edu/~kriz/"])
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert "test_batch.bin" in first and str(folder) in first and "download is off" in first
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in msg
    assert str(tmp_path / "cifar10") in msg


# ---------------------------------------------------------------- archive and download

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, archive md5, raw arrays) of a local server of a small cifar-10-binary.tar.gz."""
    src = tmp_path_factory.mktemp("src")
    arrays = make_batches(src / C.BATCHES_DIR)
    archive = src / C.ARCHIVE
    md5 = make_archive(src / C.BATCHES_DIR, archive)
    with serve_files({C.ARCHIVE: archive.read_bytes()}) as url:
        yield url, md5, arrays


def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def test_download_verify_extract(tmp_path, served):
    url, md5, (x_tr, y_tr, x_te, y_te) = served
    ds = load_dataset("cifar10", root=tmp_path, mirrors=[url + "/missing/", url + "/good/"],
                      checksums={C.ARCHIVE: md5}, progress=False, timeout=5)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_allclose(ds.x_test, expected(x_te), rtol=1e-5, atol=1e-5)
    assert ds.class_names[0] == "name0"
    # the archive is deleted once extracted; no temporary files or folders are left
    assert os.listdir(tmp_path / "cifar10") == [C.BATCHES_DIR]
    assert sorted(os.listdir(tmp_path / "cifar10" / C.BATCHES_DIR)) == sorted(C.BATCH_FILES + (C.META_FILE,))
    # present files are used as they are
    MirrorHandler.log.clear()
    load_dataset("cifar10", root=tmp_path, mirrors=[dead_url()], progress=False)
    assert MirrorHandler.log == []


def test_mirror_from_environment(tmp_path, served, monkeypatch):
    url, md5, _ = served
    monkeypatch.setenv("FASTCNN_CIFAR10_MIRROR", url + "/good/")
    ds = load_dataset("cifar10", root=tmp_path, checksums={C.ARCHIVE: md5}, progress=False, timeout=5)
    assert len(ds.y_test) == N_TEST


def test_wrong_checksum_leaves_nothing(tmp_path, served):
    url, md5, _ = served
    with pytest.raises(DataError, match="wrong checksum") as info:
        load_dataset("cifar10", root=tmp_path, mirrors=[url + "/good/"], checksums={C.ARCHIVE: "0" * 32},
                     progress=False, timeout=5)
    first = str(info.value).splitlines()[0]
    assert C.ARCHIVE in first and "0" * 32 in first and md5 in first
    assert not (tmp_path / "cifar10").exists()


def test_all_mirrors_down(tmp_path):
    with pytest.raises(DataError, match="download failed") as info:
        load_dataset("cifar10", root=tmp_path, mirrors=[dead_url()], progress=False, timeout=5)
    assert C.ARCHIVE in str(info.value) and str(tmp_path / "cifar10") in str(info.value)


def test_archive_put_by_hand_is_extracted_and_kept(tmp_path, served):
    _, md5, (_, y_tr, _, _) = served
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / C.ARCHIVE).write_bytes(MirrorHandler.files[C.ARCHIVE])
    ds = load_dataset("cifar10", root=tmp_path, mirrors=[dead_url()], checksums={C.ARCHIVE: md5}, progress=False)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    assert sorted(os.listdir(folder)) == sorted([C.ARCHIVE, C.BATCHES_DIR])
    # only the missing files are extracted again
    (folder / C.BATCHES_DIR / "data_batch_2.bin").unlink()
    ds = load_dataset("cifar10", root=tmp_path, download=False, checksums={C.ARCHIVE: md5}, progress=False)
    np.testing.assert_array_equal(ds.y_train, y_tr)


def test_archive_with_bad_checksum_by_hand(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / C.ARCHIVE).write_bytes(b"not an archive")
    with pytest.raises(DataError, match="wrong checksum") as info:
        load_dataset("cifar10", root=tmp_path, download=False)
    assert str(folder / C.ARCHIVE) in str(info.value)


def test_corrupt_archive(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    data = b"\x1f\x8b" + b"garbage" * 10
    (folder / C.ARCHIVE).write_bytes(data)
    with pytest.raises(DataError, match="corrupt archive") as info:
        load_dataset("cifar10", root=tmp_path, download=False,
                     checksums={C.ARCHIVE: hashlib.md5(data).hexdigest()})
    assert str(folder / C.ARCHIVE) in str(info.value)
    assert sorted(os.listdir(folder)) == [C.ARCHIVE]


@pytest.mark.parametrize("member", ["../evil.bin", "/tmp/evil-cifar.bin", "cifar-10-batches-bin/../../evil.bin"])
def test_unsafe_archive_rejected(tmp_path, member):
    src = tmp_path / "src"
    make_batches(src)
    folder = tmp_path / "root" / "cifar10"
    folder.mkdir(parents=True)
    md5 = make_archive(src, folder / C.ARCHIVE, extra=[(member, b"pwned")])
    with pytest.raises(DataError, match="unsafe archive") as info:
        load_dataset("cifar10", root=tmp_path / "root", download=False, checksums={C.ARCHIVE: md5})
    assert member in str(info.value)
    assert not (tmp_path / "root" / "evil.bin").exists() and not (tmp_path / "evil.bin").exists()
    assert sorted(os.listdir(folder)) == [C.ARCHIVE]


def test_archive_lacking_a_file(tmp_path):
    src = tmp_path / "src"
    make_batches(src)
    (src / "data_batch_4.bin").unlink()
    folder = tmp_path / "cifar10"
    folder.mkdir()
    md5 = make_archive(src, folder / C.ARCHIVE)
    with pytest.raises(DataError, match="lacks data_batch_4.bin"):
        load_dataset("cifar10", root=tmp_path, download=False, checksums={C.ARCHIVE: md5})
    assert sorted(os.listdir(folder)) == [C.ARCHIVE]
