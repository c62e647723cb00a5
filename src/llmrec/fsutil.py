"""Filesystem helpers shared by everything that writes a dataset, a run or a model: one writer per output
at a time, stale temporaries of killed writers removed, atomic file writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmrec.errors import LlmrecError


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of output ``out`` (``.<name>.lock`` beside it, removed when released) for the block: a
    second writer of the same output fails at once with a clear error instead of racing the first. Creates
    the parent folder; an unwritable place is an error naming it."""
    if out.parent.exists() and not out.parent.is_dir():
        raise LlmrecError(f"{out}: cannot write here ({out.parent} is a file, not a folder)")
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise LlmrecError(f"{out}: cannot write here ({e.strerror}: {e.filename})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LlmrecError(f"{out}: another llmrec process is writing it right now; wait for it to finish") from None
        try:  # the file may have been removed by the holder we waited for: lock the one that is there now
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>`` beside ``out`` left by writers that were
    killed (their process is gone); call it while holding :func:`output_lock`. Returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{out.name}.*"):
        rest = p.name[len(out.name) + 2:]
        kind, _, tail = rest.partition("-")
        if kind not in ("tmp", "old") or not tail.split("-")[0].isdigit():
            continue
        if _pid_alive(int(tail.split("-")[0])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds and removed
    when it fails, so ``path`` is either the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`), flushed to disk before the rename."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
