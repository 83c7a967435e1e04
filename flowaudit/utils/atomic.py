"""Atomic writes of files and folders: a claimed target, a temporary sibling, one rename on success.

Everything flowaudit writes goes through :func:`atomic_path` (one file) or :func:`atomic_dir` (one folder), so a
reader never sees a half-written result and a failure (an exception, Ctrl-C, SIGTERM) leaves nothing behind.
Two writers of one target never mix: each first claims it (:func:`claim`, an exclusive ``flock`` on
``.<name>.lock`` that the kernel drops when the process dies, however it dies); a second writer gets
:class:`TargetBusy` at once. Claims are re-entrant within a process. After :func:`request_stop` (the CLI's signal
handlers) the rename that would publish a result raises ``KeyboardInterrupt`` instead, even where the first one
was swallowed on the way.

A writer that claims a target also cleans what a killed writer left: stale ``.tmp`` siblings are removed, and an
``.old`` sibling of an interrupted replacement is put back when the target is gone. A file system that refuses the
write (``ENOSPC``, ``EFBIG`` with ``SIGXFSZ`` ignored, a path too long, a read-only folder) raises
:class:`OutputError`, one line naming the target, with nothing left behind. A symlinked ``--out`` is written where
the link points, so replacing it leaves exactly one folder and the link intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir", "claim", "TargetBusy", "OutputError", "request_stop", "stop_requested"]

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: claims fall back to O_EXCL lock files
    fcntl = None  # type: ignore[assignment]

_HELD: dict[Path, tuple[int, int]] = {}  # claimed target -> (lock fd, depth)
_STOP: list[str] = []  # the name of the signal that asked the process to stop, once one did


def request_stop(signal_name: str) -> None:
    """Note that ``signal_name`` asked the process to stop: no write commits after this (module docstring)."""
    if not _STOP:
        _STOP.append(signal_name)


def stop_requested() -> str | None:
    """The signal that asked the process to stop, or ``None``."""
    return _STOP[0] if _STOP else None


def _commit_allowed() -> None:
    """Raise ``KeyboardInterrupt`` where a stop was asked for, so that nothing is published after it."""
    if _STOP:
        raise KeyboardInterrupt


class TargetBusy(FileExistsError):
    """Another run is writing the same target right now."""


class OutputError(OSError):
    """The file system refused to write the output (full, size limit, read-only, name too long): a user's problem."""

    def __str__(self) -> str:  # the one line the user reads, without OSError's "[Errno N]" prefix
        return str(self.strerror)


#: errno values that say "this output cannot be written here", not "flowaudit has a bug".
_REFUSED = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large (a file-size limit)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.ENOTDIR: "a part of its path is not a folder",
}


def _ignore_xfsz() -> None:
    """Make a file-size limit fail the write (``EFBIG``) instead of killing the process (``SIGXFSZ``)."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is not None and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, signal.SIG_IGN)


def refused(exc: BaseException, target: str | os.PathLike[str]) -> OutputError | None:
    """The :class:`OutputError` that ``exc`` stands for when the file system refused to write ``target``."""
    if isinstance(exc, OutputError):
        return exc
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in _REFUSED:
        return OutputError(code, f"{target}: cannot write: {_REFUSED[code]}")
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    text = str(exc)  # libraries that give the errno only in their message (h5py: "errno = 27, …")
    for code, reason in _REFUSED.items():
        if f"errno = {code}," in text or os.strerror(code) in text:
            return OutputError(code, f"{target}: cannot write: {reason}")
    return None


def _limit_hit(tmp: Path) -> int | None:
    """The errno of a limit a failed write ran into, read from the system: for writers (torch's zip writer)
    whose error says "failed writing" but not why. A file at the file-size limit (EFBIG), or a file system
    with less than 1 MiB left for the user (ENOSPC)."""
    margin = 2**20
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
        if soft != resource.RLIM_INFINITY and any(p.stat().st_size > soft - margin for p in files):
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        fs = os.statvfs(tmp.parent)
        if fs.f_bavail * fs.f_frsize < margin:
            return errno.ENOSPC
    except (AttributeError, OSError):
        pass
    return None


def _refused_write(exc: BaseException, target: Path, tmp: Path) -> OutputError | None:
    """:func:`refused`, or failing that a limit the temporary ``tmp`` ran into (:func:`_limit_hit`)."""
    if (err := refused(exc, target)) is not None:
        return err
    if isinstance(exc, (OSError, RuntimeError)) and (code := _limit_hit(tmp)) is not None:
        return OutputError(code, f"{target}: cannot write: {_REFUSED[code]}")
    return None


def _check_name(target: Path) -> None:
    """Refuse a name the file system cannot take (too long, a NUL byte, a file or symlink loop where a folder
    must be), before anything is created."""
    if "\0" in str(target):
        raise OutputError(errno.EINVAL, f"{str(target)!r}: cannot write: the name holds a NUL byte")
    for part in target.parents:
        if os.path.lexists(part):
            if not os.path.isdir(part):  # a file, a dangling link or a link loop: no folder can be made under it
                raise OutputError(errno.ENOTDIR, f"{target}: cannot write: {part} is not a folder")
            break
    too_long = len(os.fsencode(target.name)) > 255 or len(os.fsencode(str(target))) >= 4096
    for part in target.parents:
        if os.path.isdir(part):
            with contextlib.suppress(OSError, ValueError):
                too_long = too_long or len(os.fsencode(target.name)) > os.pathconf(part, "PC_NAME_MAX")
            break
    if too_long:
        raise OutputError(errno.ENAMETOOLONG, f"{target}: cannot write: {_REFUSED[errno.ENAMETOOLONG]}")


def _clean_stale(target: Path) -> None:
    """Remove what a killed writer of ``target`` left beside it (we hold its claim: no live writer has them)."""
    try:
        base = _base(target)
        siblings = [p for p in target.parent.iterdir() if p.name.startswith(f".{base}.")]
    except OSError:
        return
    for p in siblings:
        tail = p.name[len(base) + 2 :]
        if len(tail) != 12 or tail[8] != "." or tail[9:] not in ("tmp", "old"):
            continue
        if tail.endswith("old") and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(p, target)  # killed between moving the old one aside and renaming the new one in
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _base(target: Path) -> str:
    """The name the siblings of ``target`` start from: its own, or a shortened one with a hash when it is so
    long that ``.<name>.<random>.tmp`` would pass the file system's 255-byte limit on names."""
    if len(os.fsencode(target.name)) <= 200:
        return target.name
    digest = hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]
    return f"{os.fsencode(target.name)[:100].decode(errors='ignore')}~{digest}"


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{_base(target)}.{uuid.uuid4().hex[:8]}.{tag}")


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{_base(target)}.lock")


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().split()[0]
    except (OSError, IndexError):
        return "another run"
    return f"another run (pid {pid})"


def _acquire(target: Path) -> int:
    """An fd holding the exclusive lock of ``target``; :class:`TargetBusy` when a live run holds it."""
    lock = _lock_path(target)
    for _ in range(100):  # retried only when the lock file was replaced under us
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                raise TargetBusy(f"{target}: {_holder(lock)} is writing it (lock {lock.name})") from None
            break
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (some network mounts)
                break  # the lock file still names the writer; exclusivity is best effort on such a filesystem
            os.close(fd)
            raise TargetBusy(
                f"{target}: {_holder(lock)} is writing it at the same time; wait for it or choose "
                f"another output (a lock left by a killed run is taken over)"
            ) from None
        try:  # the holder may have removed the file between our open and our lock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover
        raise TargetBusy(f"{target}: its lock {lock.name} keeps changing; another run is writing it")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def claim(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive claim on ``path`` (re-entrant within the process); yields the target.

    Raises :class:`TargetBusy` when another live run holds it. A stale lock (its
    process died, even by SIGKILL) is taken over. The lock file is removed on release.
    """
    target = Path(os.path.abspath(path))
    if target in _HELD:
        fd, depth = _HELD[target]
        _HELD[target] = (fd, depth + 1)
        try:
            yield target
        finally:
            fd, depth = _HELD[target]
            _HELD[target] = (fd, depth - 1)
        return
    _ignore_xfsz()
    _check_name(target)
    created = [d for d in (target.parent, *target.parent.parents) if not os.path.lexists(d)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(target)
    except BaseException as exc:
        _remove_empty(created)
        if (err := refused(exc, target)) is not None:
            raise err from None
        raise
    _HELD[target] = (fd, 1)
    _clean_stale(target)
    try:
        yield target
    finally:
        del _HELD[target]
        _lock_path(target).unlink(missing_ok=True)  # unlinked while still locked: no one can lock this inode after us
        os.close(fd)
        if not os.path.lexists(target):
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders a claim created (innermost first) when nothing was written in them."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; ``os.replace`` it onto ``path`` on success.

    The target is claimed first (:func:`claim`). The temporary path lives in the same
    directory (so the rename is atomic on POSIX) and is named ``.<name>.<random>.tmp``. On any exception, the
    temporary file is removed and the exception re-raised; an existing
    ``path`` is then left untouched.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    target = Path(path)
    with claim(target):
        tmp = _sibling(target, "tmp")
        try:
            yield tmp
            _commit_allowed()
            os.replace(tmp, target)
        except Exception as exc:
            if (err := _refused_write(exc, target, tmp)) is not None:
                raise err from None
            raise
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; rename it onto ``path`` on success.

    An existing ``path`` raises :class:`FileExistsError` unless ``overwrite``;
    with ``overwrite`` it is replaced only once the new folder is complete
    (moved aside, the new one renamed in, the old one deleted). On any
    exception the temporary folder is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "report"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> sorted(p.name for p in target.iterdir())
        ['a.txt']
    """
    target = Path(path)
    if target.is_symlink():  # write where the link points: one folder afterwards, the link kept
        try:
            os.stat(target)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(errno.ELOOP, f"{target}: cannot write: {_REFUSED[errno.ELOOP]}") from None
        target = Path(os.path.realpath(target))
    with claim(target):
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists (use --overwrite)")
        tmp = _sibling(target, "tmp")
        try:
            tmp.mkdir()
            yield tmp
            _commit_allowed()
            if target.exists():
                old = _sibling(target, "old")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except Exception as exc:
            if (err := _refused_write(exc, target, tmp)) is not None:
                raise err from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
