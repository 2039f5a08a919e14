"""Atomic file writes: a crash or an error never leaves a half-written file, and an existing file is
replaced only once the new one is complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from prunekit.errors import ConfigError


def check_writable(path: Path) -> None:
    """Fail early, before slow work, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory")
    if not parent.exists():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"cannot write {path}: the existing file is read-only")


@contextlib.contextmanager
def atomic_path(
    path: Path, *, suffix: str = ".tmp", fsync: bool = False, sidecars: Sequence[str] = ()
) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    `suffix` ends the temporary file's name (for writers that go by the extension). `fsync` flushes
    the finished file to disk before it replaces `path`. `sidecars` are suffixes of files the writer
    may create next to the temporary file (its name plus one of them, e.g. `.data`); they are
    removed in every case.
    """
    path = Path(path)
    check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual mode
        yield Path(tmp)
        if fsync:
            _fsync(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        for leftover in (tmp, *(tmp + s for s in sidecars)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync; the write still stands
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
