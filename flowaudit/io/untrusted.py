"""Reading untrusted files whose parser is native code: try it in a throwaway child process first.

Python code can catch every exception a reader raises, but not a segmentation fault in a C
library. HDF5 is such a library: a few flipped bytes in a ``.h5`` file can crash it outright
(found by ``tests/test_fuzz.py``), which would kill the audit with no message at all. So the
same read is first done in a forked child: if the child dies by a signal or hangs, the file is
refused with one line; if it finishes (or raises an ordinary exception), the parent does the
read itself, and gets the same result or the same exception, now catchable. The child shares
the parent's memory copy-on-write and costs a few milliseconds; without ``fork`` (not POSIX)
the read runs in-process only.

HDF5 can also point *outside* the file: an external link names a dataset in another file, a
dataset with external storage keeps its bytes in raw files named in its header, a virtual dataset
maps other files' datasets (and reads a missing source as fill values). Each lets a crafted file
make the audit read any file the user can (``/etc/passwd`` into a report) or audit zeros it never
had. :func:`h5_dataset` refuses all three with :class:`ForeignStorage`: data is what the file holds.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Callable
from typing import Any

__all__ = ["survives", "ReaderCrashed", "ForeignStorage", "h5_dataset"]


class ReaderCrashed(ValueError):
    """The reader died (a signal) or hung on the file; the message says which, without the path."""


def survives(
    read: Callable[..., Any], path: str | os.PathLike[str], *args: Any, what: str = "HDF5", timeout: float = 120.0
) -> None:
    """Run ``read(path, *args)`` in a forked child; :class:`ReaderCrashed` when the child crashes or hangs.

    An ordinary exception in the child is not reported here: the caller's own call raises it again.
    """
    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        return
    pid = os.fork()
    if pid == 0:  # the child: read, then leave without running any of the parent's exit handlers
        code = 0
        try:
            faulthandler.disable()  # its crash is expected here, and reported by the parent in one line
            read(path, *args)
        except BaseException:
            code = 1
        os._exit(code)
    deadline, status = time.monotonic() + timeout, None
    try:
        while status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
            elif time.monotonic() > deadline:
                raise ReaderCrashed(f"reading it did not finish in {timeout:.0f} s")
            else:
                time.sleep(0.002)
    finally:
        if status is None:  # timed out or interrupted: the child goes too
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ReaderCrashed(f"the {what} reader crashed on it with {name}")


class ForeignStorage(ValueError):
    """An HDF5 object that keeps its data outside the file (external link, external storage, virtual dataset)."""


def h5_dataset(f: Any, name: str) -> Any:
    """Dataset ``name`` of the open ``h5py.File`` ``f`` (``None`` if absent or not a dataset), refusing foreign storage.

    Raises :class:`ForeignStorage` naming the object when its data would come from another file.
    """
    import h5py

    link = f.get(name, getlink=True)
    if link is None:
        return None
    if isinstance(link, h5py.ExternalLink):
        raise ForeignStorage(
            f"{name!r} is an external link to {link.filename}:{link.path}; refused (data must be in the file)"
        )
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return None
    if obj.is_virtual:
        raise ForeignStorage(f"{name!r} is a virtual dataset over other files; refused (data must be in the file)")
    if obj.external:
        names = ", ".join(str(e[0]) for e in obj.external[:2])
        raise ForeignStorage(
            f"{name!r} keeps its bytes in external files ({names}); refused (data must be in the file)"
        )
    return obj
