"""Atomic file writes: a file appears under its final name complete, or not at all.

`atomic_write(target)` yields a binary file object on a temporary file created *in the target's
folder* (so the final rename stays on one filesystem and is atomic). On a clean exit the data are
flushed and fsynced, then the temporary file is renamed over the target and the folder entry is
fsynced. On any exception, KeyboardInterrupt included, the temporary file is removed and the target
is left exactly as it was (absent, or the earlier good file).

`replace=False` publishes with a hard link instead of a rename, which fails if the target appeared in
the meantime: two writers (e.g. distributed workers) can never clobber each other's result; the loser
gets `TargetExistsError` (a `FileExistsError`). On filesystems without hard links it falls back to a checked rename.

A process killed with SIGKILL cannot clean up: its temporary file stays behind, hidden (leading dot)
and named `.<target name>.<random>.partial`, never under the final name. `is_partial_file` lets
listings ignore such leftovers; `remove_stale_partials` deletes them when no writer is running.

Written here rather than taken from a library: the standard library has no atomic no-clobber
publish, and the few lines below are all it takes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"


class TargetExistsError(FileExistsError):
    """`replace=False` and the target appeared while it was being written (another writer won)."""


def is_partial_file(path: Path) -> bool:
    """True for a temporary file left by `atomic_write` (hidden, `.partial` suffix)."""
    return path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_write(target: Path | str, replace: bool = True) -> Iterator[BinaryIO]:
    """Write `target` atomically; see the module docstring. Creates missing parent folders."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        _preserve_permissions(temp)
        _publish(temp, target, replace)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_folder(target.parent)


def write_bytes_atomic(target: Path | str, data: bytes, replace: bool = True) -> None:
    """`atomic_write` for data already in memory."""
    with atomic_write(target, replace) as stream:
        stream.write(data)


def write_with(target: Path | str, writer: Callable[[BinaryIO], None], replace: bool = True) -> None:
    """`atomic_write` for a callback that writes to a file object (e.g. `PIL.Image.save`)."""
    with atomic_write(target, replace) as stream:
        writer(stream)


def remove_stale_partials(folder: Path | str) -> list[Path]:
    """Delete leftovers of killed writers under `folder` (recursively); returns what was removed.

    Only call this when no writer is running on the folder: a live writer's file looks the same.
    """
    removed = []
    for path in Path(folder).rglob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file() and is_partial_file(path):
            path.unlink()
            removed.append(path)
    return removed


def _preserve_permissions(temp: Path) -> None:
    """mkstemp creates 0600; give the result the permissions a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(temp, 0o666 & ~umask)


def _publish(temp: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # fails with FileExistsError if the target exists: no clobbering
    except FileExistsError:
        raise TargetExistsError(f"{target.name} appeared in {target.parent} while it was being written; "
                              "left it as it is") from None
    except OSError:  # no hard links on this filesystem: checked rename (a tiny race window)
        if target.exists():
            raise TargetExistsError(f"{target.name} appeared in {target.parent} while it was being written; "
                                  "left it as it is") from None
        os.replace(temp, target)
        return
    temp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened for fsync on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
