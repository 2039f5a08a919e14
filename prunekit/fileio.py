"""Atomic file writes: a crash or an error never leaves a half-written file, and an existing file is
replaced only once the new one is complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from prunekit.errors import ConfigError, WriteError


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
    if path.exists() and not path.is_file():
        # a device, pipe or socket: replacing it with a file would destroy it (`-o /dev/full` as root)
        raise ConfigError(f"cannot write {path}: it exists and is not a regular file")
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
    removed in every case. A write that fails in the file system (a full disk, a file size limit, an
    I/O error) is a WriteError naming `path`; the previous file at `path` is untouched. Temporary
    files that a killed process (SIGKILL, power loss) left for the same `path` are removed first.
    """
    path = Path(path)
    check_writable(path)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=suffix, dir=path.parent
        )
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual mode
        try:
            yield Path(tmp)
            if fsync:
                _fsync(tmp)
            os.replace(tmp, path)
            if fsync:  # the rename itself, so that power loss leaves the old file or the new one
                _fsync(str(path.parent))
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        except RuntimeError as exc:
            if not _is_write_failure(exc):
                raise
            raise WriteError(f"cannot write {path}: {_write_failure_reason(path)}") from exc
    finally:
        for leftover in (tmp, *(tmp + s for s in sidecars)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the hidden temporary files (`.<name>.<pid>.*`) of writes to `path` whose process no
    longer runs: what a SIGKILL during a write leaves behind. Returns what was removed."""
    path = Path(path)
    prefix = _temp_prefix(path)
    removed: list[Path] = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for candidate in candidates:
        pid_text = candidate.name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def _is_write_failure(exc: RuntimeError) -> bool:
    # torch.save reports a failed write from its C++ zip writer as a RuntimeError, e.g.
    # "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"
    text = str(exc)
    return "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text


def _write_failure_reason(path: Path) -> str:
    """The likely cause of a write that failed without an errno (torch's C++ writer drops it)."""
    import shutil

    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return "No space left on device"
    return "the file system refused the write (disk full, file size limit or I/O error)"


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
