"""Write a directory (or a file) so that nothing already there is lost: one helper for merge, checkpoints
and datasets, and `staged_file` for the files the CLI writes.

`staged_dir(dest)` yields a fresh hidden sibling of `dest`. When the block finishes, the sibling is
renamed onto `dest`; on every failure path (an exception, ENOSPC, Ctrl-C) it is removed and `dest` is
untouched. An existing `dest` is replaced only when `may_replace(dest)` says so (by default: only an
empty or an earlier complete directory), and that is asked before any work is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from vembed.artifacts.integrity import check_replaceable
from vembed.errors import StorageError, first_line


def os_error(exc: OSError, fallback: str | os.PathLike[str]) -> StorageError:
    """`path: reason` for an OSError, naming the file it was about (else `fallback`)."""
    where = exc.filename if exc.filename is not None else fallback
    reason = exc.strerror or type(exc).__name__
    return StorageError(f"{where}: {reason}")


@contextlib.contextmanager
def staged_dir(
    dest: str | os.PathLike[str],
    may_replace: Callable[[Path], None] = check_replaceable,
    tmp_name: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling of `dest`, renamed onto it when the block succeeds.

    `may_replace(dest)` raises when an existing `dest` must not be replaced (checked before the
    block runs). An OSError in the block becomes a one-line StorageError `path: reason`.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        may_replace(dest)
    tmp = dest.with_name(tmp_name or f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a leftover of a killed process with the same name
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise os_error(e, dest.parent) from None
    try:
        yield tmp
        publish(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            if e.filename is not None and str(e.filename).startswith(str(tmp)):
                e.filename = None  # the temporary copy is gone: name the destination instead
            raise os_error(e, dest) from None
        # safetensors reports a failed write (disk full, ...) as its own error
        if isinstance(e, SafetensorError) and "I/O error" in str(e):
            raise StorageError(f"{dest}: cannot write ({first_line(e)})") from None
        raise


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished directory onto `dest`; readers see the old one, nothing, or the new one."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:  # put the previous one back
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: Path, overwrite: bool) -> None:
    """A file a command is about to write, checked before its slow part: not a directory, and an
    existing file is replaced only with `overwrite` (--overwrite)."""
    if path.is_dir():
        raise StorageError(f"{path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise StorageError(f"{path}: exists; refusing to replace it (--overwrite replaces it)")


@contextlib.contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """A hidden sibling of `dest` to write; renamed onto `dest` when the block finishes, removed on any failure."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
