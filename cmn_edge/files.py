"""Writing files so that a crash, a kill or a full disk never leaves half of one, and hashing them.

The one place for both: the runtime's commands, the index and the training side all use it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def storable_name(path: str | os.PathLike) -> bool:
    """Whether a path can be written as UTF-8 text (the index's database, Parquet): a name
    written in another encoding (Latin-1 from an old camera or archive), which Python keeps
    as lone surrogates, cannot."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _umask() -> int:
    """The process umask (there is no way to read it without setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable; platforms that cannot open a directory (Windows) skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_special_file(path: str | os.PathLike) -> bool:
    """A device or FIFO (``/dev/null``, a pipe): renaming over it would replace it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _stream_link(path: Path) -> bool:
    """``/dev/stdout`` and its kind: a link to whatever the stream is (a pipe, or a file
    redirected with ``>>``), written through as it is, never replaced."""
    return path.is_symlink() and path.parts[:2] in (("/", "dev"), ("/", "proc"))


def publish(temp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make a finished temporary file ``target``, durably: fsync it, rename it over
    ``target``, fsync the folder."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, target)
    fsync_dir(Path(target).parent)


def publish_folder(temp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``temp`` to ``target`` (same file system).

    An earlier ``target`` is swapped with the new one in one step where the kernel can
    (Linux's ``renameat2(RENAME_EXCHANGE)``), then removed: at every moment ``target`` is
    the old folder or the new one. Elsewhere it is moved aside first, and for the moment
    between the two renames ``target`` is absent (the old folder then waits beside it).
    A kill just after the swap leaves the old folder under ``temp``'s name: a ``temp``
    from :func:`staging_folder` is removed by the next one.
    """
    import shutil
    import uuid

    temp, target = Path(temp), Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if _exchange(temp, target):
            os.replace(temp, old)  # temp holds the old folder now
        else:
            os.replace(target, old)
            os.replace(temp, target)
    else:
        os.replace(temp, target)
    fsync_dir(parent)
    # this one, and any an interrupted clean-up left (never needed: target is whole)
    for stale in parent.glob(f".{glob.escape(target.name)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def staging_folder(target: str | os.PathLike) -> Path:
    """A new hidden sibling of ``target`` (same file system, so :func:`publish_folder` can
    rename it) to build its replacement in, named after this process and host; not made.

    Earlier ones of this host whose process is gone are removed first: a job killed with
    -9 or a power cut, or one killed inside ``publish_folder`` just after the swap (then
    the sibling holds the *old* folder). Each is a whole index or embeddings folder that
    nothing else would ever remove. Another host's (a folder on a share) are left alone:
    its process numbers mean nothing here.
    """
    import shutil
    import socket
    import uuid

    target = Path(target)
    host = socket.gethostname()
    for stale in target.parent.glob(f".{glob.escape(target.name)}.new-*"):
        owner = stale.name.rsplit(".new-", 1)[1].rpartition("-")[0]
        pid, _, built_on = owner.partition("@")
        if pid.isdigit() and built_on == host and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return target.with_name(f".{target.name}.new-{os.getpid()}@{host}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: never ask
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's, or unknowable: left alone
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux 3.15+, glibc 2.28+, most local file systems);
    False where that cannot be done, and nothing was changed. By hand through ctypes: the
    standard library has no binding for renameat2."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a path beside ``target`` (not yet existing) for a library that writes by path
    (hnswlib's save, SQLite's ``VACUUM INTO`` or backup); on success it is published over
    ``target``, on any error removed. ``atomic_write`` is the same for a file handle."""
    target = Path(target)
    temp = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # debris of a killed earlier attempt: SQLite will not write over it
    try:
        yield temp
        publish(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, durable: bool = True, **open_kwargs: Any
) -> Iterator[IO]:
    """Yield a handle to a temporary file beside ``path``; on success it replaces ``path``.

    On any error (a full disk included) the temporary file is removed and ``path`` keeps
    its old content. The new file gets the mode a plain ``open`` would give (0666 less the
    umask), not ``mkstemp``'s 0600. A device or FIFO target is written through instead,
    and a symbolic link's target is replaced, not the link (``/dev/stdout`` is appended to).
    """
    target = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, not '{mode}'")
    if is_special_file(target) or _stream_link(target):
        # a stream is appended to: reopening it to write would truncate what `>>` kept
        through = mode.replace("w", "a") if _stream_link(target) else mode
        with open(target, through, **open_kwargs) as handle:
            yield handle
        return
    if target.is_symlink():  # `-o link` writes the file it points to; the link stays a link
        target = Path(os.path.realpath(target))
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{target}: folder {folder} does not exist")
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(temp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, target)
        if durable:
            fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(target)  # a failed write (a full disk) names no file; say which
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    with atomic_write(path, "wb", durable=durable) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    with atomic_write(path, "w", durable=durable, encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "publish_folder",
    "storable_name",
    "atomic_path",
    "atomic_write",
    "file_sha256",
    "fsync_dir",
    "is_special_file",
    "publish",
    "staging_folder",
    "write_bytes_atomic",
    "write_text_atomic",
]
