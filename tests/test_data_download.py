"""Verified downloads against a local HTTP server on 127.0.0.1 (never the internet).

The server serves small fake MNIST files generated in a temporary folder; their
MD5s are passed with ``checksums=`` since the published MD5s are those of the
real files. URL prefixes select a behaviour: ``/good/`` serves the files,
``/missing/`` answers 404, ``/truncated/`` announces the full Content-Length
but sends half and hangs up, ``/short/`` sends half the file with a matching
Content-Length (so only the MD5 can tell), ``/corrupt/`` flips a byte.
"""
import errno
import hashlib
import os
import socket

import numpy as np
import pytest

from fastcnn import atomicio
from fastcnn.data import download as dl
from fastcnn.data import load_dataset
from fastcnn.data.idx import write_idx
from fastcnn.data.mnist import FILE_NAMES, SPECS
from fastcnn.errors import DataError, UserError

from conftest import MirrorHandler, serve_files

N_TRAIN, N_TEST = 20, 10


def make_fake_mnist(folder, n_train=N_TRAIN, n_test=N_TEST, seed=0, compress=True):
    """Write the four files in ``folder``; return ({name: md5}, {name: array})."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, a in arrays.items():
        path = folder / (name if compress else name[:-3])
        write_idx(path, a, compress=compress)
        md5[name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5, arrays


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, {name: md5}, {name: array}) of a local server of fake MNIST files."""
    src = tmp_path_factory.mktemp("mirror")
    md5, arrays = make_fake_mnist(src)
    with serve_files({name: (src / name).read_bytes() for name in FILE_NAMES}) as url:
        yield url, md5, arrays


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """No proxy for 127.0.0.1, no mirror override from the environment, a clean log."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("FASTCNN_MNIST_MIRROR", raising=False)
    monkeypatch.delenv("FASTCNN_FASHION_MNIST_MIRROR", raising=False)
    MirrorHandler.log.clear()


def dead_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def load(root, mirrors, md5, **kw):
    kw.setdefault("progress", False)
    return load_dataset("mnist", root=root, mirrors=mirrors, checksums=md5, timeout=5, **kw)


def test_download_good_files(tmp_path, served):
    url, md5, arrays = served
    ds = load(tmp_path, [url + "/good/"], md5)
    folder = tmp_path / "mnist"
    assert sorted(os.listdir(folder)) == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        assert dl.md5_of(folder / name) == md5[name]
    assert ds.x_train.shape == (N_TRAIN, 28, 28, 1) and ds.x_test.shape == (N_TEST, 28, 28, 1)
    expected = (arrays["train-images-idx3-ubyte.gz"] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train[..., 0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte.gz"])
    # Present files are used as they are: no further requests, even with no mirror reachable.
    MirrorHandler.log.clear()
    ds2 = load(tmp_path, [dead_url()], md5)
    assert MirrorHandler.log == []
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)


def test_second_mirror_used_when_first_404s(tmp_path, served):
    url, md5, _ = served
    ds = load(tmp_path, [url + "/missing/", url + "/good/"], md5)
    assert len(ds.y_train) == N_TRAIN
    assert MirrorHandler.log[:2] == ["/missing/train-images-idx3-ubyte.gz", "/good/train-images-idx3-ubyte.gz"]
    assert sorted(os.listdir(tmp_path / "mnist")) == sorted(FILE_NAMES)


def test_only_missing_files_are_fetched(tmp_path, served):
    url, md5, _ = served
    folder = tmp_path / "mnist"
    make_fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    load(tmp_path, [url + "/good/"], md5)
    assert MirrorHandler.log == ["/good/t10k-labels-idx1-ubyte.gz"]


def test_mirror_from_environment(tmp_path, served, monkeypatch):
    url, md5, _ = served
    monkeypatch.setenv("FASTCNN_MNIST_MIRROR", f"{url}/missing, {url}/good")
    ds = load_dataset("mnist", root=tmp_path, checksums=md5, progress=False, timeout=5)
    assert len(ds.y_test) == N_TEST
    assert "/missing/train-images-idx3-ubyte.gz" in MirrorHandler.log


def test_fashion_mnist_download(tmp_path, served, monkeypatch):
    url, md5, _ = served
    monkeypatch.setenv("FASTCNN_FASHION_MNIST_MIRROR", f"{url}/good/")
    ds = load_dataset("fashion-mnist", root=tmp_path, checksums=md5, progress=False, timeout=5)
    assert ds.name == "fashion-mnist" and ds.class_names[0] == "T-shirt/top" and ds.num_classes == 10
    assert sorted(os.listdir(tmp_path / "fashion-mnist")) == sorted(FILE_NAMES)
    assert not (tmp_path / "mnist").exists()


def test_progress_bar(tmp_path, served, capsys):
    url, md5, _ = served
    load(tmp_path, [url + "/good/"], md5, progress=True)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


@pytest.mark.parametrize("mode,message", [
    ("truncated", "incomplete.*cut short"),
    ("short", "wrong checksum"),
    ("corrupt", "wrong checksum"),
])
def test_bad_download_leaves_nothing(tmp_path, served, mode, message):
    url, md5, _ = served
    with pytest.raises(DataError, match=message) as info:
        load(tmp_path, [f"{url}/{mode}/"], md5)
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert "train-images-idx3-ubyte.gz" in first and str(tmp_path / "mnist") in first
    if mode != "truncated":
        assert md5["train-images-idx3-ubyte.gz"] in first  # the expected checksum, beside the one got
    assert not (tmp_path / "mnist").exists()          # no file, no temporary file


def test_wrong_md5_names_both_checksums(tmp_path, served):
    url, md5, _ = served
    wrong = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DataError) as info:
        load(tmp_path, [url + "/good/"], wrong)
    first = str(info.value).splitlines()[0]
    assert "train-images-idx3-ubyte.gz" in first
    assert "0" * 32 in first and md5["train-images-idx3-ubyte.gz"] in first
    assert not (tmp_path / "mnist").exists()


def test_bad_first_mirror_good_second(tmp_path, served):
    url, md5, _ = served
    ds = load(tmp_path, [url + "/truncated/", url + "/corrupt/", url + "/good/"], md5)
    assert len(ds.y_train) == N_TRAIN
    assert sorted(os.listdir(tmp_path / "mnist")) == sorted(FILE_NAMES)


def test_all_mirrors_down(tmp_path):
    mirrors = [dead_url(), dead_url()]
    with pytest.raises(DataError) as info:
        load(tmp_path, mirrors, None)
    msg = str(info.value)
    first = msg.splitlines()[0]
    folder = str(tmp_path / "mnist")
    assert folder in first and "download failed" in first
    for name in FILE_NAMES:
        assert name in first
    for m in mirrors:
        assert m in msg
    assert not (tmp_path / "mnist").exists()  # the folder it made for the files is gone again


def test_a_failed_download_leaves_no_folders_behind(tmp_path):
    with pytest.raises(DataError, match="download failed"):
        load(tmp_path / "new" / "root", [dead_url()], None)
    assert os.listdir(tmp_path) == []  # new/root/mnist made for the download, removed again


def test_download_off(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path, [dead_url()], None, download=False)
    first = str(info.value).splitlines()[0]
    assert str(tmp_path / "mnist") in first and "download is off" in first
    for name in FILE_NAMES:
        assert name in first
    assert "ossci-datasets" not in str(info.value)  # the overriding mirror is what is suggested
    assert not (tmp_path / "mnist").exists()


def test_offline_message_suggests_public_mirrors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root=tmp_path, download=False)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in str(info.value)


def test_folder_not_creatable(tmp_path, served):
    url, md5, _ = served
    root = tmp_path / "a-file"
    root.write_text("not a folder")
    with pytest.raises(DataError, match="cannot create the data folder") as info:
        load(root, [url + "/good/"], md5)
    assert str(root / "mnist") in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_folder_not_writable(tmp_path, served):
    url, md5, _ = served
    folder = tmp_path / "mnist"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DataError, match="cannot write") as info:
            load(tmp_path, [url + "/good/"], md5)
        assert str(folder) in str(info.value)
    finally:
        folder.chmod(0o700)


def test_interrupted_download_removes_temp_file(tmp_path, monkeypatch, served):
    url, md5, _ = served

    def boom(url, out, *args):
        out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_fetch_into", boom)
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path, [url + "/good/"], md5)
    assert not (tmp_path / "mnist").exists()


def test_download_file_direct(tmp_path, served):
    url, md5, _ = served
    dest = tmp_path / "x.gz"
    dl.download_file(f"{url}/good/t10k-labels-idx1-ubyte.gz", dest, md5["t10k-labels-idx1-ubyte.gz"],
                     progress=False, timeout=5)
    assert dl.md5_of(dest) == md5["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(dl.DownloadFailed, match="404"):
        dl.download_file(f"{url}/missing/t10k-labels-idx1-ubyte.gz", tmp_path / "y", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["x.gz"]


def test_mirror_list_resolution(monkeypatch):
    default = SPECS["mnist"].mirrors
    assert dl.mirrors_for("mnist", default) == list(default)
    assert dl.mirrors_for("mnist", default, "http://h/x") == ["http://h/x/"]
    monkeypatch.setenv("FASTCNN_MNIST_MIRROR", "file:///a, http://b/")
    assert dl.mirrors_for("mnist", default) == ["file:///a/", "http://b/"]
    assert dl.mirrors_for("mnist", default, ["http://c/"]) == ["http://c/"]  # argument wins
    assert dl.env_var_for("fashion-mnist") == "FASTCNN_FASHION_MNIST_MIRROR"


def test_error_is_user_error():
    assert issubclass(DataError, UserError)


def test_temp_file_not_creatable(tmp_path, served, monkeypatch):
    """Stands in for an unwritable folder when the tests run as root."""
    url, md5, _ = served

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomicio.tempfile, "mkstemp", denied)
    with pytest.raises(DataError, match="cannot write to the data folder") as info:
        load(tmp_path, [url + "/good/"], md5)
    assert str(tmp_path / "mnist") in str(info.value)


def test_disk_full_while_writing(tmp_path, served, monkeypatch):
    """A write that fails half way (ENOSPC): one DataError naming the folder, no temporary file left."""
    url, md5, _ = served

    def disk_full(url, out, *args):
        out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_fetch_into", disk_full)
    with pytest.raises(DataError, match="cannot write to the data folder .*No space left on device") as info:
        load(tmp_path, [url + "/good/"], md5)
    assert str(tmp_path / "mnist") in str(info.value)
    assert not (tmp_path / "mnist").exists()


def test_file_url_mirror(tmp_path):
    """A local folder works as a mirror (air-gapped machines): FASTCNN_MNIST_MIRROR=file:///..."""
    md5, _ = make_fake_mnist(tmp_path / "src")
    ds = load(tmp_path / "cache", [(tmp_path / "src").as_uri()], md5)
    assert len(ds.y_train) == N_TRAIN
    assert sorted(os.listdir(tmp_path / "cache" / "mnist")) == sorted(FILE_NAMES)
