"""Shared test helpers: numerical gradients, data location, torch availability."""
import contextlib
import http.server
import os
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIG = os.path.join(REPO, "configs", "synthetic_small.yaml")


def numerical_grad(f, x, eps=1e-6, indices=None):
    """Central differences of the scalar f() w.r.t. array x (modified in place and restored).

    ``indices``: flat indices to check (default: all).
    """
    flat = x.reshape(-1)
    idx = range(flat.size) if indices is None else indices
    grad = np.zeros(flat.size, dtype=np.float64)
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape)


def sample_indices(size, count, rng):
    """Up to ``count`` distinct flat indices (all of them when the array is small)."""
    if size <= count:
        return np.arange(size)
    return rng.choice(size, size=count, replace=False)


def mnist_root():
    """The folder holding mnist/ (from $FASTCNN_DATA), or None."""
    root = os.environ.get("FASTCNN_DATA")
    if root and os.path.exists(os.path.join(root, "mnist", "train-images-idx3-ubyte.gz")):
        return root
    return None


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """A fake download mirror: GET /<mode>/<name> serves ``files[name]``.

    Modes: good; missing (404); truncated (half the bytes, full Content-Length);
    short (half the bytes, honest length); corrupt (one byte flipped).
    ``log`` records the paths requested.
    """

    files = {}
    log = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.log.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        data = self.files.get(name)
        if mode == "missing" or data is None:
            self.send_error(404)
            return
        length = len(data)
        if mode == "truncated":
            data = data[: len(data) // 2]
        elif mode == "short":
            data = data[: len(data) // 2]
            length = len(data)
        elif mode == "corrupt":
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def serve_files(files):
    """A MirrorHandler server on 127.0.0.1 serving ``files`` ({name: bytes}); yields its base URL."""
    MirrorHandler.files = dict(files)
    MirrorHandler.log.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_cli(argv, capsys):
    """Run the ``fastcnn`` entry point in-process: (exit code, stdout, stderr)."""
    from fastcnn.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """best.npz of configs/synthetic_small.yaml trained one epoch on 1 thread (trained once per session)."""
    from fastcnn.cli import main

    out_dir = tmp_path_factory.mktemp("small_run")
    with pytest.raises(SystemExit) as info:
        main(["train", SMALL_CONFIG, "--set", f"output.dir={out_dir}", "--set", "train.epochs=1", "--threads", "1",
              "--no-progress"])
    assert info.value.code == 0
    return str(out_dir / "best.npz")
