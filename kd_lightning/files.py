"""Writing files other runs read: atomically, under a lock between jobs, named by a content key.

Every file and directory the library writes for later reading (trained teachers, recordings,
decoded data, results, exports) goes through :func:`atomic_write` or :func:`atomic_directory`,
so a crash or a full disk never leaves a half-written file where a later run would trust it.
Sweep jobs that need the same cached thing serialise on :func:`job_lock` (the ``filelock``
package: portable, released when the process dies).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix (``torch.export.save`` insists on ``.pt2``,
    ``np.savez`` on ``.npz``) and the file gets the usual permissions (umask), not
    ``mkstemp``'s owner-only ones. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None:  # a failed write names no file: name the one being written
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (a full disk raises ``OSError`` naming ``path``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def atomic_directory(path: Path, resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    ``path`` then either holds a complete result or does not exist. Hold :func:`job_lock` on ``path``.
    Not ``resumable``: the directory starts empty and is removed on any error or interruption (and
    those that killed writers left beside ``path`` are removed first). ``resumable``: the directory
    is ``.<name>.partial`` and is kept on failure with what it holds, for the next writer to resume from.
    """
    if resumable:
        tmp = path.with_name(f".{path.name}.partial")
    else:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=resumable)
    try:
        yield tmp
        if path.exists():  # a stale, incomplete directory from a killed writer
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, path: Path) -> None:
    """Rename the complete file or folder ``new`` to ``path``, in place of what was there (a file or a folder). The old
    one is first renamed to ``.<name>.replaced`` and removed after; :func:`restore_replaced` puts it back if a process
    was killed between the two renames."""
    aside = path.with_name(f".{path.name}.replaced")
    if path.exists():
        remove(aside)  # a leftover, if any: path is complete
        os.replace(path, aside)
    os.replace(new, path)
    remove(aside)


def remove(path: Path) -> None:
    """Delete the file or folder ``path``, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_replaced(path: Path) -> None:
    """Put back the complete ``path`` that :func:`replace_path` had moved aside, when killed before its new
    one was renamed into place."""
    aside = path.with_name(f".{path.name}.replaced")
    if aside.exists() and not path.exists():
        os.replace(aside, path)


@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path + '.lock'`` between processes (parallel sweep jobs) for the block."""
    lock_file = path.with_name(path.name + ".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_file):
        yield


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.corrupt-<unix time>`` beside it (kept for inspection); return the new path."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, aside)
    return aside


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, or of a folder's files (each one's name and digest, in name order)."""
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{p.relative_to(path)}:{file_sha256(p)};" for p in files).encode()).hexdigest()


def content_key(identity: Any) -> str:
    """16 hex digits identifying a JSON-able description (the key of a cached thing)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
