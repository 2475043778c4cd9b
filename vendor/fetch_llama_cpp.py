"""Fill vendor/llama.cpp/ with the pinned llama.cpp source.

The source comes from the PyPI source distribution named in llama.cpp.pin. The
archive is downloaded through the package index (PEP 503 simple API, the same
index pip uses, honouring PIP_INDEX_URL), its sha256 is checked *before*
anything is extracted, and only the folders the build needs are unpacked.

The downloaded archive is kept in a cache folder (MULLAMA_CACHE_DIR, else
~/.cache/mullama) so a fresh checkout does not download it again.

Usage: python vendor/fetch_llama_cpp.py [--force]
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "llama.cpp.pin"
DEST = HERE / "llama.cpp"
STAMP = DEST / ".mullama-pin"

# Top-level entries of llama.cpp that the library build (and the benchmark's
# build of llama-bench / llama-server / llama-batched-bench) needs. Models,
# docs, tests, the web UI assets and the Python tooling are left out; of models/ only the chat
# templates are kept (tool-calling tests render the real templates of several model families).
NEEDED = (
    "CMakeLists.txt",
    "LICENSE",
    "cmake",
    "common",
    "ggml",
    "include",
    "licenses",
    "models/templates",
    "scripts",
    "src",
    "tools",
    "vendor",
)


def read_pin() -> dict[str, str]:
    pin: dict[str, str] = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        pin[key.strip()] = value.strip()
    return pin


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: D401 - html.parser API
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value:
                    self.links.append(value)


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def find_download_url(pin: dict[str, str]) -> str:
    page = f"{_index_url()}/{pin['sdist_name']}/"
    with urllib.request.urlopen(page, timeout=60) as resp:
        parser = _LinkParser()
        parser.feed(resp.read().decode("utf-8", "replace"))
    for link in parser.links:
        url = urllib.parse.urljoin(page, link)
        if urllib.parse.urlparse(url).path.endswith("/" + pin["sdist_file"]):
            return url.split("#", 1)[0]
    raise RuntimeError(f"{pin['sdist_file']} is not listed on {page}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("MULLAMA_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mullama"


def obtain_sdist(pin: dict[str, str]) -> Path:
    target = cache_dir() / "sdist" / pin["sdist_file"]
    if target.exists() and sha256_of(target) == pin["sdist_sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = find_download_url(pin)
    print(f"mullama: downloading {url}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        got = sha256_of(Path(tmp_name))
        if got != pin["sdist_sha256"]:
            raise RuntimeError(
                f"sha256 mismatch for {pin['sdist_file']}: expected {pin['sdist_sha256']}, got {got}"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _safe_members(tar: tarfile.TarFile, prefix: str):
    for member in tar.getmembers():
        name = member.name
        if not name.startswith(prefix + "/"):
            continue
        rel = name[len(prefix) + 1 :]
        if not any(rel == keep or rel.startswith(keep + "/") for keep in NEEDED):
            continue
        if not (member.isfile() or member.isdir()) or ".." in Path(rel).parts:
            continue  # nothing the build needs is a link or a device; refuse anything odd
        member.name = rel
        yield member


def extract(sdist: Path, pin: dict[str, str], dest: Path = DEST) -> None:
    # The digest is checked again here: extraction must never see an unverified archive.
    if sha256_of(sdist) != pin["sdist_sha256"]:
        raise RuntimeError(f"{sdist} does not match the pinned sha256")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".llama.cpp-"))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = list(_safe_members(tar, pin["sdist_folder"]))
            if not members:
                raise RuntimeError(f"{pin['sdist_folder']} not found inside {sdist}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: members were already screened above
                tar.extractall(tmp, members=members)
        (tmp / STAMP.name).write_text(_stamp(pin))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _stamp(pin: dict[str, str]) -> str:
    # the list of extracted folders is part of the stamp: changing it re-extracts
    return pin["sdist_sha256"] + " " + ",".join(NEEDED) + "\n"


def is_current(pin: dict[str, str], dest: Path = DEST) -> bool:
    stamp = dest / STAMP.name
    return stamp.exists() and stamp.read_text() == _stamp(pin)


def ensure(force: bool = False) -> Path:
    """Make sure vendor/llama.cpp holds the pinned source; return its path."""
    pin = read_pin()
    if force or not is_current(pin):
        extract(obtain_sdist(pin), pin)
    return DEST


def main(argv: list[str]) -> int:
    force = "--force" in argv
    path = ensure(force=force)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
