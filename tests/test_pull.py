"""The downloader (mullama.pull) against a local HTTP server that misbehaves on request."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.server
import os
import re
import socket
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

import mullama
from mullama import DownloadError, cli, default_model, pull, store
from gguf_factory import tiny_model_bytes

FILE = "/files/tiny.gguf"


@dataclass
class Plan:
    """How the server answers one request (the default: correctly)."""

    ignore_range: bool = False       # answer 200 with the whole file even to a Range request
    drop_after: int | None = None    # close the connection after this many body bytes
    stall_after: int | None = None   # send this many body bytes, then go silent
    pause_after: tuple[int, float] | None = None  # (bytes, seconds): a slow server
    corrupt_at: int | None = None    # flip the byte at this file offset
    wrong_start: int | None = None   # answer a Range request with a 206 starting here
    length_delta: int = 0            # lie in Content-Length by this much
    status: int | None = None        # answer with this status and no body


@dataclass
class Seen:
    path: str
    range: str | None
    headers: dict[str, str]
    status: int = 0
    sent: int = 0


@dataclass
class ModelServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``files``; ``plans`` script the next answers."""

    files: dict[str, bytes]
    plans: deque[Plan] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                owner._answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that went away mid-body is part of the tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str = FILE) -> str:
        return self.base + path

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        plan = self.plans.popleft() if self.plans else Plan()
        rng = h.headers.get("Range")
        seen = Seen(h.path, rng, dict(h.headers))
        self.seen.append(seen)
        data = self.files.get(h.path)
        if plan.status or data is None:
            seen.status = plan.status or 404
            h.send_response(seen.status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if plan.corrupt_at is not None:
            data = data[:plan.corrupt_at] + bytes([data[plan.corrupt_at] ^ 0xFF]) + data[plan.corrupt_at + 1:]
        start = 0
        if rng and not plan.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if plan.wrong_start is not None:
                start = plan.wrong_start
            if start >= len(data):
                seen.status = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        seen.status = 206 if start or (rng and not plan.ignore_range) else 200
        h.send_response(seen.status)
        if seen.status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body) + plan.length_delta))
        h.end_headers()
        cut = min(x for x in (plan.drop_after, plan.stall_after, len(body)) if x is not None)
        if plan.length_delta < 0:
            cut = min(cut, len(body) + plan.length_delta)
        if plan.pause_after is not None:
            n, pause = plan.pause_after
            h.wfile.write(body[:n])
            h.wfile.flush()
            time.sleep(pause)
            h.wfile.write(body[n:cut])
        else:
            h.wfile.write(body[:cut])
        h.wfile.flush()
        seen.sent = cut
        if plan.stall_after is not None:
            self.release.wait(10)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return tiny_model_bytes()


@pytest.fixture()
def server(model_bytes: bytes) -> Iterator[ModelServer]:
    srv = ModelServer({FILE: model_bytes})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "home"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(server: ModelServer, dest: Path, **kw: Any) -> Path:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retry_delay", 0.0)
    kw.setdefault("progress", False)
    return pull.download(server.url(), dest, **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".gguf"))


# ---------------------------------------------------------------- plain downloads


def test_download_with_sha256_and_progress(server, model_bytes, tmp_path):
    seen: list[tuple[int, int | None]] = []
    dest = fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes).upper(),
                 progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == model_bytes
    assert leftovers(tmp_path) == []
    assert seen[0] == (0, len(model_bytes)) and seen[-1] == (len(model_bytes), len(model_bytes))
    assert server.seen[0].headers["User-Agent"] == f"mullama/{mullama.__version__}"
    assert "Authorization" not in server.seen[0].headers


def test_existing_file_is_kept_and_force_downloads_again(server, model_bytes, tmp_path):
    dest = fetch(server, tmp_path / "m.gguf")
    fetch(server, dest)
    assert len(server.seen) == 1
    with pytest.raises(DownloadError, match="already exists but its sha256"):
        fetch(server, dest, sha256="0" * 64)
    fetch(server, dest, force=True, sha256=sha(model_bytes))
    assert len(server.seen) == 2 and dest.read_bytes() == model_bytes


def test_redirect_is_followed(server, model_bytes, tmp_path):
    # A second tiny server that redirects to the first.
    target = server.url()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        dest = pull.download(f"http://127.0.0.1:{httpd.server_address[1]}/x.gguf", tmp_path / "b.gguf",
                             progress=False, timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert dest.read_bytes() == model_bytes and [s.path for s in server.seen] == [FILE]


def test_progress_bar_only_on_a_terminal(server, tmp_path, monkeypatch, capsys):
    fetch(server, tmp_path / "a.gguf", progress=None)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(pull, "_stderr_is_tty", lambda: True)
    server.plans.append(Plan(drop_after=100_000))  # the bar survives a resume
    fetch(server, tmp_path / "b.gguf", progress=None)
    err = capsys.readouterr().err
    assert "b.gguf" in err and "100%" in err


def test_http_errors_are_clear(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*check the repository"):
        pull.download(server.url("/missing.gguf"), tmp_path / "x.gguf", progress=False)
    server.plans.extend([Plan(status=503), Plan(status=503)])
    with pytest.raises(DownloadError, match="HTTP 503.*gave up after 1 retries"):
        fetch(server, tmp_path / "x.gguf", retries=1)
    assert not (tmp_path / "x.gguf").exists()


def test_hf_token_goes_to_hugging_face_hosts_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    for url, expected in [("https://huggingface.co/a/b/resolve/main/c.gguf", "Bearer secret"),
                          ("https://cdn-lfs.hf.co/x.gguf", "Bearer secret"),
                          ("https://evil-huggingface.co/x.gguf", None),
                          ("http://127.0.0.1:1/x.gguf", None)]:
        req = pull._Download(url, Path("unused"), 1.0, lambda d, t: None)._request(0)
        assert req.unredirected_hdrs.get("Authorization") == expected
        assert "Authorization" not in req.headers  # never copied onto a redirect


# ---------------------------------------------------------------- resuming


def test_dropped_connection_is_resumed_with_a_range_request(server, model_bytes, tmp_path):
    server.plans.append(Plan(drop_after=100_000))
    dest = fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes))
    assert dest.read_bytes() == model_bytes
    first, second = server.seen
    assert first.range is None and first.sent == 100_000
    assert second.range == "bytes=100000-" and second.status == 206
    assert second.sent == len(model_bytes) - 100_000


def test_partial_download_survives_for_the_next_pull(server, model_bytes, tmp_path):
    server.plans.append(Plan(drop_after=50_000))
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=r"after 50000 of the \d+ bytes.*resume"):
        fetch(server, dest, retries=0)
    part = tmp_path / "m.gguf.part"
    assert part.read_bytes() == model_bytes[:50_000] and not dest.exists()
    fetch(server, dest, sha256=sha(model_bytes))  # a new call: the hash of the .part is recomputed
    assert dest.read_bytes() == model_bytes and server.seen[-1].range == "bytes=50000-"
    assert leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_from_zero(server, model_bytes, tmp_path):
    part = tmp_path / "m.gguf.part"
    part.write_bytes(b"not the start of the file" * 100)
    server.plans.append(Plan(ignore_range=True))
    dest = fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes))
    assert dest.read_bytes() == model_bytes
    assert server.seen[0].range == "bytes=2500-" and server.seen[0].status == 200
    assert len(server.seen) == 1


def test_206_at_a_wrong_offset_restarts_from_zero(server, model_bytes, tmp_path):
    (tmp_path / "m.gguf.part").write_bytes(model_bytes[:70_000])
    server.plans.append(Plan(wrong_start=60_000))
    dest = fetch(server, tmp_path / "m.gguf", retries=0)
    assert dest.read_bytes() == model_bytes
    assert [s.range for s in server.seen] == ["bytes=70000-", None]
    assert [s.status for s in server.seen] == [206, 200]


def test_complete_part_is_finished_after_416(server, model_bytes, tmp_path):
    (tmp_path / "m.gguf.part").write_bytes(model_bytes)
    dest = fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes))
    assert dest.read_bytes() == model_bytes and [s.status for s in server.seen] == [416]


def test_part_longer_than_the_file_starts_over(server, model_bytes, tmp_path):
    (tmp_path / "m.gguf.part").write_bytes(model_bytes + b"extra")
    dest = fetch(server, tmp_path / "m.gguf")
    assert dest.read_bytes() == model_bytes and [s.status for s in server.seen] == [416, 200]


# ---------------------------------------------------------------- bad data


def test_corrupted_byte_with_known_sha256_is_rejected(server, model_bytes, tmp_path):
    server.plans.append(Plan(corrupt_at=len(model_bytes) - 10))
    with pytest.raises(DownloadError) as info:
        fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes))
    message = str(info.value)
    assert "sha256 mismatch" in message and sha(model_bytes) in message
    bad = bytearray(model_bytes)
    bad[-10] ^= 0xFF
    assert sha(bytes(bad)) in message
    assert list(tmp_path.iterdir()) == []


def test_corrupted_header_without_sha256_is_rejected(server, tmp_path):
    server.plans.append(Plan(corrupt_at=0))
    with pytest.raises(DownloadError, match="not a usable GGUF file.*magic"):
        fetch(server, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_content_length_too_long_is_an_error(server, tmp_path):
    server.plans.append(Plan(length_delta=1000))
    with pytest.raises(DownloadError, match=r"closed the connection after \d+ of the \d+ bytes"):
        fetch(server, tmp_path / "m.gguf", retries=0)
    assert not (tmp_path / "m.gguf").exists()


def test_content_length_too_short_gives_a_truncated_file_that_is_rejected(server, tmp_path):
    server.plans.append(Plan(length_delta=-1000))
    with pytest.raises(DownloadError, match="not a usable GGUF file"):
        fetch(server, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- failures while downloading


def test_stall_times_out(server, tmp_path):
    server.plans.append(Plan(stall_after=10_000))
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="stalled: no data for 0.3 s"):
        fetch(server, tmp_path / "m.gguf", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert (tmp_path / "m.gguf.part").stat().st_size == 10_000
    assert not (tmp_path / "m.gguf").exists()


def test_full_disk_is_a_clean_error(server, tmp_path, monkeypatch):
    real = pull._write_all
    written = []

    def write_until_full(fh: Any, data: bytes) -> None:
        if written:
            real(fh, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        real(fh, data)

    monkeypatch.setattr(pull, "_write_all", write_until_full)
    with pytest.raises(DownloadError, match="no space left.*partial download was deleted"):
        fetch(server, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_not_enough_free_space_is_refused_before_writing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(pull.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(DownloadError, match="not enough disk space.*10 free"):
        fetch(server, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_ctrl_c_leaves_no_final_file(server, model_bytes, tmp_path):
    def interrupt(done: int, total: int | None) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(server, tmp_path / "m.gguf", progress=interrupt)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.lock").exists()
    assert 0 < (tmp_path / "m.gguf.part").stat().st_size < len(model_bytes)
    fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes))  # and it resumes
    assert server.seen[-1].range is not None


def test_unreachable_host(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(DownloadError, match="cannot reach 127.0.0.1"):
        pull.download(f"http://127.0.0.1:{port}/m.gguf", tmp_path / "m.gguf", progress=False)


# ---------------------------------------------------------------- concurrency


def test_two_concurrent_pulls_give_one_correct_file(server, model_bytes, tmp_path):
    server.plans.append(Plan(pause_after=(100_000, 0.3)))
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(fetch(server, tmp_path / "m.gguf", sha256=sha(model_bytes)))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert results == [tmp_path / "m.gguf"] * 2
    assert (tmp_path / "m.gguf").read_bytes() == model_bytes
    assert len(server.seen) == 1 and leftovers(tmp_path) == []


def test_lock_timeout_names_the_other_pull(server, tmp_path):
    lock = tmp_path / "m.gguf.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another pull of m.gguf is still running"):
            fetch(server, tmp_path / "m.gguf", lock_timeout=0.2)
    assert server.seen == []


# ---------------------------------------------------------------- pull() and the CLI


def test_pull_default_model_needs_no_network(monkeypatch):
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    try:
        expected = default_model.default_model_path()
    except mullama.DefaultModelMissingError:
        pytest.skip("the default model package is not installed")
    assert pull.pull("gemma3:270m") == expected
    assert pull.pull(" Gemma3:270M ", sha256=default_model.DEFAULT_MODEL_SHA256) == expected
    with pytest.raises(ValueError, match="embedded model"):
        pull.pull("gemma3:270m", sha256="1" * 64)


def test_pull_hf_reference_into_the_store(server, model_bytes, home, monkeypatch):
    server.files["/owner/repo/resolve/main/sub/tiny.gguf"] = model_bytes
    monkeypatch.setenv("MULLAMA_HF_ENDPOINT", server.base + "/")
    path = pull.pull("hf:owner/repo/sub/tiny.gguf", progress=False)
    assert path == home / "models" / "tiny.gguf" and path.read_bytes() == model_bytes
    assert store.resolve("tiny") == path


def test_cli_pull_list_rm(server, model_bytes, home, monkeypatch, capsys):
    server.files["/owner/repo/resolve/main/tiny.gguf"] = model_bytes
    monkeypatch.setenv("MULLAMA_HF_ENDPOINT", server.base)
    assert cli.main(["pull", "hf:owner/repo/tiny.gguf", "--sha256", sha(model_bytes), "--timeout", "5"]) == 0
    path = home / "models" / "tiny.gguf"
    assert capsys.readouterr().out.strip() == str(path)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tiny\.gguf\s+\d+\.\d kB\s+F32\s+" + re.escape(str(path)), out), out
    assert cli.main(["rm", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == f"removed {path}"
    assert not path.exists()


def test_cli_pull_errors(server, model_bytes, home, capsys):
    assert cli.main(["pull", server.url(), "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mullama: error: sha256 mismatch") and sha(model_bytes) in err
    assert cli.main(["pull", server.url(), "--sha256", "xyz"]) == 1
    assert "not a sha256 digest" in capsys.readouterr().err
    assert cli.main(["pull", "nosuch:model"]) == 1
    assert "unknown model 'nosuch:model'" in capsys.readouterr().err
    assert cli.main(["pull", server.base + "/files/..%2F..%2Fescape.gguf"]) == 1
    assert "path separator" in capsys.readouterr().err
    assert not (home / "escape.gguf").exists() and not (home.parent / "escape.gguf").exists()
