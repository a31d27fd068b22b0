"""The IDX format of MNIST and Fashion-MNIST, and the errors every data loader raises.

Kept apart from :mod:`oodforge.data.loaders` so that :mod:`oodforge.data.fashion` can read IDX files
without importing the loader that dispatches to it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for (the message says how to get them)."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format (the message names the file)."""



_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, detected from its first bytes).

    Validates the magic number (two zero bytes, a type code, the number of dimensions) and that the
    payload length matches the header; raises :class:`DatasetFormatError` naming the file otherwise.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DatasetFormatError(f"{path}: cannot read/decompress ({e}); the file is corrupt, download it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
            "expected 0x0000 + type code + ndim, e.g. 00000803 for images, 00000801 for labels"
        )
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX payload is {len(raw) - header} bytes, header {shape} says {expected}; the file is "
            "truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()
