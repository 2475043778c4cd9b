"""``SequenceState``: a sequence's tokens and KV cells, to save, branch and resume.

A snapshot holds the token ids of a sequence, the keys and values llama.cpp
keeps for the first ``n_cached`` of them (``llama_state_seq_get_data``), and
a fingerprint of the model that made them. Continuing from it evaluates only
the tokens after ``n_cached``: with the snapshot of a running stream that is
its last sampled token, so greedy decoding goes on with exactly the tokens the
uninterrupted stream would have produced. A snapshot holds no sampler state:
sampled continuations draw from the seed their new config gives.

Snapshots are plain data: picklable, comparable, and written to a file of
their own format by :meth:`SequenceState.save` (atomically: a reader sees the
old file or the new one, never half of one).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mullama.errors import StateError

if TYPE_CHECKING:
    from mullama.model import Model

__all__ = ["SequenceState", "model_fingerprint"]

_MAGIC = b"MULLAMA-SEQSTATE\n"
_VERSION = 1
_FINGERPRINT_KEYS = ("desc", "n_vocab", "n_embd", "n_layer", "n_head", "n_params", "size")


def model_fingerprint(model: "Model") -> dict[str, Any]:
    """What a snapshot records of its model: architecture sizes, parameter count and the
    model's name. Two files that agree on all of these take each other's snapshots."""
    info = model._handle.info()
    fp = {key: info[key] for key in _FINGERPRINT_KEYS}
    fp["name"] = model.metadata.get("general.name", "")
    return fp


@dataclass(frozen=True)
class SequenceState:
    """A sequence's tokens, the KV cells of the first ``n_cached`` of them, and its model's
    fingerprint. Made by ``Context.save_state()`` and ``TokenStream.snapshot()``; used by
    ``Context.load_state()`` and ``generate_stream(..., state=...)``."""

    tokens: tuple[int, ...]
    n_cached: int
    data: bytes
    model: dict[str, Any]
    n_seq: int = 1    # sequences of the context it was taken in: llama.cpp's cell data lists
                      # one KV stream per sequence, so it loads only where that count is the same

    def __post_init__(self) -> None:
        if not 0 <= self.n_cached <= len(self.tokens):
            raise StateError(f"n_cached ({self.n_cached}) must be within the {len(self.tokens)} tokens")

    @classmethod
    def _from_engine(cls, parts: tuple[np.ndarray, int, bytes], model: "Model", n_seq: int) -> "SequenceState":
        tokens, n_kv, data = parts
        return cls(tuple(int(t) for t in tokens), int(n_kv), bytes(data), model_fingerprint(model), n_seq)

    @property
    def token_array(self) -> np.ndarray:
        return np.asarray(self.tokens, dtype=np.int32)

    def check_model(self, model: "Model") -> None:
        """Raise :class:`StateError` unless this snapshot was made with ``model``'s weights."""
        mine = model_fingerprint(model)
        if mine != self.model:
            diff = sorted(k for k in set(mine) | set(self.model) if mine.get(k) != self.model.get(k))
            raise StateError(f"the snapshot was made with another model ({', '.join(diff)} differ: "
                             f"{self.model.get('desc')!r} vs {mine.get('desc')!r})")

    def check_layout(self, n_seq: int, n_ctx: int) -> None:
        """Raise :class:`StateError` unless the snapshot fits a context of ``n_seq``
        sequences holding ``n_ctx`` tokens each."""
        if self.n_seq != n_seq:
            raise StateError(
                f"the snapshot was taken in a context of {self.n_seq} sequence(s) and cannot be loaded "
                f"into one of {n_seq} (llama.cpp stores one KV stream per sequence): continue it where "
                f"n_parallel is {self.n_seq}, or from its tokens")
        if len(self.tokens) >= n_ctx:
            raise StateError(f"the snapshot has {len(self.tokens)} tokens but the context holds {n_ctx}")

    def prompt(self, model: "Model", extra: str | bytes | Any = None) -> np.ndarray:
        """The snapshot's tokens followed by ``extra`` (text, tokenized without BOS, or ids)."""
        base = self.token_array
        if extra is None or (isinstance(extra, (str, bytes)) and not extra):
            return base
        if isinstance(extra, (str, bytes)):
            more = np.asarray(model.tokenize(extra, add_special=False, parse_special=True), dtype=np.int32)
        else:
            more = np.asarray(list(extra), dtype=np.int32)
        return np.concatenate([base, more])

    # ------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot to ``path`` atomically (a temporary file, then a rename)."""
        path = os.fspath(path)
        meta = json.dumps({"version": _VERSION, "n_cached": self.n_cached, "n_tokens": len(self.tokens),
                           "data_len": len(self.data), "model": self.model, "n_seq": self.n_seq}).encode()
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".seqstate-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC)
                f.write(struct.pack("<I", len(meta)))
                f.write(meta)
                f.write(np.asarray(self.tokens, dtype="<i4").tobytes())
                f.write(self.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SequenceState":
        """Read a snapshot written by :meth:`save`; a file that is not one raises StateError."""
        with open(path, "rb") as f:
            blob = f.read()
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 4:
            raise StateError(f"{os.fspath(path)!r} is not a mullama sequence snapshot")
        at = len(_MAGIC)
        (n_meta,) = struct.unpack_from("<I", blob, at)
        at += 4
        try:
            meta = json.loads(blob[at:at + n_meta])
            n_tokens, data_len = int(meta["n_tokens"]), int(meta["data_len"])
            n_cached, model, version = int(meta["n_cached"]), dict(meta["model"]), meta["version"]
            n_seq = int(meta["n_seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{os.fspath(path)!r}: unreadable snapshot header ({exc})") from None
        if version != _VERSION:
            raise StateError(f"{os.fspath(path)!r}: snapshot format {version} is not supported")
        at += n_meta
        if len(blob) != at + 4 * n_tokens + data_len:
            raise StateError(f"{os.fspath(path)!r}: the snapshot is truncated or has extra bytes")
        tokens = np.frombuffer(blob, dtype="<i4", count=n_tokens, offset=at)
        data = blob[at + 4 * n_tokens:]
        return cls(tuple(int(t) for t in tokens), n_cached, data, model, n_seq)
