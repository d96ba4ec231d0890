"""IDX reader/writer: round trips, gzip detection, and every way a file can be broken."""
import gzip

import numpy as np
import pytest

from fastcnn.data.idx import read_idx, read_idx_images, read_idx_labels, write_idx
from fastcnn.errors import DataError, UserError


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (5, 28, 28)),
    (np.uint8, (7,)),
    (np.int8, (3, 4)),
    (np.int16, (2, 3, 4, 5)),
    (np.int32, (6,)),
    (np.float32, (2, 3)),
    (np.float64, (4, 1)),
])
def test_round_trip(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        a = rng.standard_normal(shape).astype(dtype)
    p = tmp_path / "a.idx"
    write_idx(p, a, compress=compress)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable and b.flags.c_contiguous


def test_mnist_header_bytes(tmp_path):
    p = tmp_path / "x"
    write_idx(p, np.zeros((2, 3, 4), np.uint8), compress=False)
    data = p.read_bytes()
    assert int.from_bytes(data[:4], "big") == 2051
    assert [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(3)] == [2, 3, 4]
    assert len(data) == 16 + 24
    write_idx(p, np.zeros(5, np.uint8), compress=False)
    assert int.from_bytes(p.read_bytes()[:4], "big") == 2049


def test_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw_named_gz = tmp_path / "plain.gz"
    gz_named_raw = tmp_path / "compressed-idx3-ubyte"
    write_idx(raw_named_gz, a, compress=False)
    write_idx(gz_named_raw, a, compress=True)
    np.testing.assert_array_equal(read_idx(raw_named_gz), a)
    np.testing.assert_array_equal(read_idx(gz_named_raw), a)


def test_write_is_deterministic(tmp_path):
    a = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a", a)
    write_idx(tmp_path / "b", a)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_expected_magic(tmp_path):
    img, lab = tmp_path / "img", tmp_path / "lab"
    write_idx(img, np.zeros((2, 28, 28), np.uint8))
    write_idx(lab, np.zeros(2, np.uint8))
    assert read_idx_images(img).shape == (2, 28, 28)
    assert read_idx_labels(lab).shape == (2,)
    with pytest.raises(DataError, match=r"lab.*magic number 2049, expected 2051"):
        read_idx_images(lab)
    with pytest.raises(DataError, match=r"img.*magic number 2051, expected 2049"):
        read_idx_labels(img)


def _raw(a):
    a = np.asarray(a, np.uint8)
    return bytes([0, 0, 8, a.ndim]) + b"".join(s.to_bytes(4, "big") for s in a.shape) + a.tobytes()


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("content,message", [
    (b"<html>not found</html>", "bad magic number"),
    (b"\x00\x00\x07\x03" + bytes(20), "bad magic number"),        # unknown type code
    (b"\x00\x00\x08\x00" + bytes(20), "bad magic number"),        # zero dimensions
    (b"", "truncated IDX header"),
    (b"\x00\x00", "truncated IDX header"),
    (_raw(np.zeros((2, 3, 3)))[:10], "truncated IDX header"),     # sizes cut off
    (_raw(np.zeros((2, 3, 3)))[:-1], "truncated IDX file"),       # one pixel short
    (_raw(np.zeros((2, 3, 3)))[:16], "truncated IDX file"),       # header only
    (_raw(np.zeros((2, 3, 3))) + b"\x00", "unexpected bytes"),    # trailing garbage
])
def test_broken_files(tmp_path, compress, content, message):
    p = tmp_path / "broken-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, UserError)


def test_truncated_gzip(tmp_path):
    p = tmp_path / "t.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated gzip") as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "c.gz"
    write_idx(p, np.arange(1000, dtype=np.int32))
    data = bytearray(p.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC/size trailer
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt gzip") as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="folder"):
        read_idx(tmp_path)


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", np.zeros(3, np.uint16))
