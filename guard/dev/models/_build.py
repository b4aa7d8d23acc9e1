"""Build the seed SavedModels into a directory, cached by content.

The cache check needs no TensorFlow: the stamp is a hash of this package's
source files and the installed TensorFlow/tf-keras/numpy versions, read from
package metadata. Only a real (re)build imports TensorFlow.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guard.dev.models import _spec

logger = logging.getLogger(__name__)

STAMP_FILE = ".guard-models-stamp"
LABELS_FILE = "labels.txt"
VERSION = 1
_PACKAGE_DIR = Path(__file__).resolve().parent


def content_stamp() -> str:
    """Hash of everything that determines the built models."""
    digest = hashlib.sha256()
    for source in sorted(_PACKAGE_DIR.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    for dist in ("tensorflow", "tf-keras", "numpy"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{dist}={version};".encode())
    return digest.hexdigest()


def model_paths(out_dir: Path) -> dict[str, Path]:
    """Base paths (TF Serving's ``--model_base_path``) of the seed models under ``out_dir``."""
    return {name: out_dir / name for name in _spec.MODEL_NAMES}


def _is_current(out_dir: Path, stamp: str) -> bool:
    stamp_path = out_dir / STAMP_FILE
    if not stamp_path.is_file() or stamp_path.read_text().strip() != stamp:
        return False
    return all(
        (base / str(VERSION) / "saved_model.pb").is_file() for base in model_paths(out_dir).values()
    )


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialise builders (a test session and a demo may build the same directory)."""
    with open(out_dir / ".guard-models-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_models(out_dir: Path, *, force: bool = False) -> dict[str, Path]:
    """Build the seed SavedModels under ``out_dir``; return name -> base path.

    Layout (TF Serving's): ``out_dir/<name>/1/saved_model.pb``, plus
    ``out_dir/<name>/labels.txt`` with one class name per line. A second call with
    unchanged sources returns at once without importing TensorFlow.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = content_stamp()
    paths = model_paths(out_dir)
    if not force and _is_current(out_dir, stamp):
        logger.info("seed models in %s are up to date", out_dir)
        return paths
    with _locked(out_dir):
        if not force and _is_current(out_dir, stamp):
            return paths
        started = time.monotonic()
        from guard.dev.models import _keras

        (out_dir / STAMP_FILE).unlink(missing_ok=True)
        for name, base in paths.items():
            staging = out_dir / f".staging-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            version_dir = staging / str(VERSION)
            _keras.export(name, version_dir)
            _keras.verify(name, version_dir)
            (staging / LABELS_FILE).write_text("\n".join(_spec.labels(name)) + "\n")
            shutil.rmtree(base, ignore_errors=True)
            os.replace(staging, base)
            logger.info("built %s -> %s", name, base)
        _write_atomic(out_dir / STAMP_FILE, stamp + "\n")
        logger.info("built %d seed models in %.1f s", len(paths), time.monotonic() - started)
    return paths
