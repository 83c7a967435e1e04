"""``stats.h5``: the HDF5 file a fitted feature Gaussian is kept in, written atomically.

Datasets ``n``, ``reference``, ``sum``, ``sum_sq``, ``sum_cubic``,
``sum_quartic``, ``location``, ``covariance``, ``cholesky``; attributes
``format`` (``"flowaudit-stats"``), ``format_version``, ``estimator``,
``shrinkage``, ``dim``, ``n_inputs``, ``n_nonfinite``, ``flowaudit_version``
and one per metadata key (strings and numbers as they are, lists as JSON).
A file of a newer format version, or one that is not HDF5 or not ours, is
refused with a one-line :class:`ValueError`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._version import __version__
from ..io.untrusted import ForeignStorage, ReaderCrashed, h5_dataset, survives
from ..utils.atomic import atomic_path

__all__ = ["ARRAYS", "write_stats", "read_stats"]

FORMAT = "flowaudit-stats"
FORMAT_VERSION = 1
ARRAYS = ("n", "reference", "sum", "sum_sq", "sum_cubic", "sum_quartic", "location", "covariance", "cholesky")
HEADER = ("estimator", "shrinkage", "dim", "n_inputs", "n_nonfinite")
RESERVED = frozenset({"format", "format_version", *HEADER, "flowaudit_version", "metadata_keys", "json_keys"})


def write_stats(
    path: str | os.PathLike[str], arrays: dict[str, Any], header: dict[str, Any], metadata: dict[str, Any]
) -> None:
    """Write ``arrays`` (:data:`ARRAYS`), the ``header`` attributes and ``metadata`` to ``path``, atomically."""
    if clash := sorted(RESERVED & metadata.keys()):
        raise ValueError(f"metadata keys {clash} are reserved by the stats format")
    json_keys = [k for k, v in metadata.items() if isinstance(v, (list, tuple))]
    encoded = {key: _encode(key, value) for key, value in metadata.items()}  # fail before anything is written
    # HDF5 builds the file in memory; Python writes the bytes. A full disk or a file-size limit is then one
    # OSError (EFBIG, ENOSPC: an OutputError, exit 2) instead of a library left in a broken state that
    # crashes the process while it closes the file.
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            **header,
            flowaudit_version=__version__,
            metadata_keys=json.dumps(list(metadata)),
            json_keys=json.dumps(json_keys),
        )
        f.attrs.update(encoded)
        for name in ARRAYS:
            f[name] = arrays[name]
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(buffer.getbuffer())


def read_stats(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """``(arrays, header, metadata)`` of a stats file; see the module docstring for what is refused.

    The file is untrusted: it is first read in a throwaway child (:func:`~flowaudit.io.untrusted.survives`,
    HDF5 can crash on broken bytes); anything h5py raises, a header of the wrong type or
    an array that is not a number (``dim`` an integer, ``n`` and ``sum_quartic`` scalars, the
    others arrays of floats) is one :class:`ValueError` line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such stats file: {path}")
    if not path.is_file():  # a folder, FIFO, socket or device: reading it could block or never end
        raise ValueError(f"{path} is not a flowaudit stats file (not a regular file)")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not a flowaudit stats file (not HDF5)")
    try:
        survives(_read, path)  # a corrupt file can crash the HDF5 library itself
    except ReaderCrashed as e:
        raise ValueError(f"{path} is not a valid flowaudit stats file (corrupt: {e})") from None
    try:
        arrays, header, metadata = _read(path)
        _check_types(arrays, header)
    except _Refused as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # h5py on broken bytes: OSError, KeyError, RuntimeError, TypeError, …
        raise ValueError(
            f"{path} is not a valid flowaudit stats file ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None
    return arrays, header, metadata


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    with h5py.File(path, "r") as f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        if attrs.get("format") != FORMAT:
            raise _Refused(f"{path} is not a flowaudit stats file (no format={FORMAT!r} attribute)")
        version = attrs.get("format_version", 0)
        if not isinstance(version, (int, np.integer)):
            raise _Refused(f"{path} is not a valid flowaudit stats file (format_version {version!r})")
        if version > FORMAT_VERSION:
            raise _Refused(f"{path} was written by a newer flowaudit ({attrs.get('flowaudit_version')})")
        arrays = {}
        for k in ARRAYS:
            try:
                ds = h5_dataset(f, k)
            except ForeignStorage as e:
                raise _Refused(f"{path} is not a valid flowaudit stats file ({e})") from None
            if ds is None:
                raise _Refused(f"{path} is not a valid flowaudit stats file (no dataset {k!r})")
            arrays[k] = ds[()]
        missing = [k for k in (*HEADER, "json_keys", "metadata_keys") if k not in attrs]
        missing += [k for k in (json.loads(attrs["metadata_keys"]) if not missing else ()) if k not in attrs]
        if missing:
            raise _Refused(f"{path} is not a valid flowaudit stats file (no attribute {', '.join(map(repr, missing))})")
        header = {k: attrs[k] for k in HEADER}
        json_keys = set(json.loads(attrs["json_keys"]))
        metadata = {k: json.loads(attrs[k]) if k in json_keys else attrs[k] for k in json.loads(attrs["metadata_keys"])}
    return arrays, header, metadata


class _Refused(ValueError):
    """A refusal whose message is already the one line to show."""


def _check_types(arrays: dict[str, Any], header: dict[str, Any]) -> None:
    for key in ("dim", "n_inputs", "n_nonfinite"):
        if not isinstance(header[key], (int, np.integer)) or header[key] < 0:
            raise TypeError(f"header {key} = {header[key]!r} is not a count")
    if not isinstance(header["estimator"], str) or not isinstance(header["shrinkage"], (int, float, np.number)):
        raise TypeError("header estimator/shrinkage of the wrong type")
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.kind not in "iuf":
            raise TypeError(f"{name} holds {a.dtype}, not numbers")
        if name in ("n", "sum_quartic") and a.ndim != 0:
            raise TypeError(f"{name} has shape {a.shape}, not a scalar")


def _encode(key: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value))
        except TypeError:
            raise TypeError(f"metadata {key!r}: list items must be JSON-serialisable") from None
    if isinstance(value, (str, bool, int, float, np.number, np.bool_)):
        return value
    raise TypeError(f"metadata {key!r}: expected a string, a number or a list of strings, got {type(value).__name__}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
