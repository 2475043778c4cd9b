"""Check a GGUF file's header in Python before llama.cpp parses it."""

from __future__ import annotations

import struct

from mullama.errors import ModelLoadError

__all__ = ["validate_gguf_file"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


def validate_gguf_file(path: str) -> None:
    """Raise ModelLoadError unless ``path`` starts like a GGUF file llama.cpp can read."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24:
        raise ModelLoadError(f"{path!r} is too short to be a GGUF file ({len(head)} bytes)", path=path)
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path!r} is not a GGUF file (magic {head[:4]!r})", path=path)
    (version,) = struct.unpack_from("<I", head, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path!r} has unsupported GGUF version {version}", path=path)
