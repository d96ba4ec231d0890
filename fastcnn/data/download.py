"""Verified, atomic downloads of dataset files from a list of mirrors.

Each file is fetched with urllib from the first mirror that serves it, its
MD5 checked while it streams into a temporary file in the destination folder,
then fsync'ed and renamed into place (``os.replace``). On any failure the
temporary file is removed, so the folder only ever holds complete, verified
files.

Mirrors can be overridden (tests, private mirrors, air-gapped machines) with
the ``mirrors=`` argument or the environment variable
``FASTCNN_<DATASET>_MIRROR`` (``FASTCNN_MNIST_MIRROR``,
``FASTCNN_FASHION_MNIST_MIRROR``): one or more base URLs separated by commas
or spaces; ``file://`` URLs work too.
"""
import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from fastcnn.atomicio import AtomicFile
from fastcnn.errors import DataError

__all__ = ["DEFAULT_TIMEOUT", "mirrors_for", "download_files", "download_file", "md5_of",
           "DownloadFailed", "ChecksumMismatch", "IncompleteDownload"]

DEFAULT_TIMEOUT = 30.0  # seconds per connection attempt / read
CHUNK = 1 << 16


class DownloadFailed(Exception):
    """One URL could not be fetched (network, HTTP error, cut-short body)."""


class ChecksumMismatch(DownloadFailed):
    """The downloaded bytes do not have the expected MD5."""


class IncompleteDownload(DownloadFailed):
    """The server sent fewer bytes than it announced (Content-Length)."""


def _new_md5():
    try:
        return hashlib.md5(usedforsecurity=False)
    except TypeError:  # pragma: no cover - very old Python
        return hashlib.md5()


def md5_of(path):
    """Hex MD5 of a file."""
    h = _new_md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def env_var_for(dataset):
    """``fashion-mnist`` -> ``FASTCNN_FASHION_MNIST_MIRROR``."""
    return "FASTCNN_" + dataset.upper().replace("-", "_") + "_MIRROR"


def mirrors_for(dataset, default, mirrors=None):
    """The mirror list: ``mirrors`` if given, else the env variable, else ``default``."""
    if mirrors is None:
        env = os.environ.get(env_var_for(dataset), "").strip()
        if env:
            mirrors = env.replace(",", " ").split()
        else:
            mirrors = default
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return [m if m.endswith("/") else m + "/" for m in mirrors]


def _describe(exc):
    """A short, one-line reason for a failed fetch."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror
        return str(reason)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early ({len(exc.partial)} more bytes read, {exc.expected} missing)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def download_file(url, dest, md5=None, *, timeout=DEFAULT_TIMEOUT, progress=True):
    """Fetch ``url`` into ``dest`` atomically, checking its MD5 (hex) if given.

    Raises :class:`DownloadFailed` (or :class:`ChecksumMismatch`) for problems
    with the source, :class:`DataError` if the destination folder cannot be
    written. Nothing is left behind on failure.
    """
    dest = Path(dest)
    folder = dest.parent
    try:
        part = AtomicFile(dest, suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to the data folder {folder}: {e.strerror or e}") from None
    try:
        with part as out:
            _fetch_into(url, out, dest.name, md5, timeout, progress)
    except OSError as e:  # writing, syncing or renaming the file (the network's errors are DownloadFailed)
        raise DataError(f"cannot write to the data folder {folder}: {e.strerror or e}") from None


def _fetch_into(url, out, name, md5, timeout, progress):
    h = _new_md5()
    received = 0
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadFailed(_describe(e)) from None
    with response:
        length = response.headers.get("Content-Length")
        try:
            length = int(length) if length is not None else None
        except ValueError:
            length = None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=name, leave=False, dynamic_ncols=True)
        try:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as e:
                    raise IncompleteDownload(
                        f"the download was cut short: got {received + len(e.partial)} of {length} bytes"
                    ) from None
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadFailed(_describe(e)) from None
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if length is not None and received != length:
        raise IncompleteDownload(f"the download was cut short: got {received} of {length} bytes")
    if md5 is not None:
        got = h.hexdigest()
        if got != md5.lower():
            raise ChecksumMismatch(f"MD5 {got}, expected {md5.lower()}, {received} bytes")


def download_files(folder, names, checksums, mirrors, *, dataset, timeout=DEFAULT_TIMEOUT,
                   progress=True, hint=""):
    """Download each of ``names`` into ``folder`` from the first mirror that works.

    ``checksums``: {name: md5 hex or None}. Raises DataError when a file cannot
    be fetched from any mirror: for network problems the message lists every
    file still missing and where to put it (``hint`` is appended); for corrupt
    downloads (wrong MD5, cut short) it names the file and what was wrong.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # made here, deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"cannot write to the data folder {folder}: permission denied")
    names = list(names)
    try:
        _download_all(folder, names, checksums, mirrors, dataset, timeout, progress, hint)
    except BaseException:
        for p in created:  # a failed download leaves no empty folders behind (files fetched stay)
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _download_all(folder, names, checksums, mirrors, dataset, timeout, progress, hint):
    """download_files' loop over the files, into the existing ``folder``."""
    for i, name in enumerate(names):
        failures = []  # (url, DownloadFailed)
        for mirror in mirrors:
            url = mirror + name
            try:
                download_file(url, folder / name, checksums.get(name), timeout=timeout, progress=progress)
            except DownloadFailed as e:
                failures.append((url, e))
                continue
            break
        else:
            tried = "\n".join(f"  {url}: {e}" for url, e in failures)
            corrupt = [(url, e) for url, e in failures if not _is_network(e)]
            if corrupt:
                url, e = corrupt[0]
                kind = "has the wrong checksum" if isinstance(e, ChecksumMismatch) else "is incomplete"
                raise DataError(
                    f"{dataset}: the download of {name} {kind} ({e}); nothing was saved in {folder}\n"
                    f"tried:\n{tried}\n{hint}".rstrip()
                )
            missing = ", ".join(names[i:])
            raise DataError(
                f"{dataset}: files missing in {folder} ({missing}) and the download failed "
                f"({failures[0][1] if failures else 'no mirrors'})\n"
                + (f"tried:\n{tried}\n" if failures else "")
                + hint
            )


def _is_network(exc):
    """True for failures that say nothing about the file (offline, 404, timeout)."""
    return not isinstance(exc, (ChecksumMismatch, IncompleteDownload))
