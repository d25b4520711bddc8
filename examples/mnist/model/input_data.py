"""Read MNIST-style IDX files (optionally gzip-compressed) into flat Python lists.

The IDX format: a big-endian header (magic 0x0000080D with D = number of dimensions, then one uint32 per
dimension) followed by unsigned bytes.  Images are 3-D (count, rows, cols), labels 1-D (count).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path


def read_idx(path: str | Path) -> tuple[tuple[int, ...], bytes]:
    """Return ``(shape, raw bytes)`` of an IDX file of unsigned bytes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as stream:
        magic = stream.read(4)
        if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != 0x08:
            raise ValueError(f"{path}: not an IDX file of unsigned bytes")
        dims = magic[3]
        shape = struct.unpack(f">{dims}I", stream.read(4 * dims))
        data = stream.read()
    expected = 1
    for size in shape:
        expected *= size
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} data bytes, expected {expected} for shape {shape}")
    return shape, data


def read_images(path: str | Path) -> tuple[int, int, int, bytes]:
    """Images as ``(count, rows, cols, bytes)`` (row-major, one unsigned byte per pixel)."""
    shape, data = read_idx(path)
    if len(shape) != 3:
        raise ValueError(f"{path}: images must have 3 dimensions, got {len(shape)}")
    return shape[0], shape[1], shape[2], data


def read_labels(path: str | Path) -> bytes:
    shape, data = read_idx(path)
    if len(shape) != 1:
        raise ValueError(f"{path}: labels must have 1 dimension, got {len(shape)}")
    return data
