"""Generate the example's MNIST-format data set from scikit-learn's bundled 8x8 digits (stdlib only).

    python3 examples/mnist/make_data.py scikit_learn-<version>-<tags>.whl     # or .../digits.csv.gz
    # (pip download --no-deps scikit-learn -d /tmp gives the wheel; sklearn need not be installed)

scikit-learn ships the UCI "optical recognition of handwritten digits" test set (1,797 images of 8x8
pixels, values 0..16) as ``sklearn/datasets/data/digits.csv.gz``: 64 pixel values and the label per line.
This script upscales each image to 28x28 (bilinear, pixel centres aligned), scales the values to
0..255, splits the images by a fixed shuffle (1,437 train / 360 test) and writes the four files of the
MNIST distribution into ``data/`` beside it (or ``--out``), in the IDX format:

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

The outputs are byte-reproducible: the split depends only on ``--seed`` and the files are gzipped with
mtime 0 and no file name in the header.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
import sys
import zipfile
from pathlib import Path

MEMBER = "sklearn/datasets/data/digits.csv.gz"
SOURCE_SIDE = 8
SOURCE_MAX = 16
SIDE = 28


def read_digits(source: Path) -> list[tuple[list[float], int]]:
    """``(64 pixel values, label)`` per image, from a scikit-learn wheel, ``digits.csv.gz`` or ``.csv``."""
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            try:
                raw = gzip.decompress(wheel.read(MEMBER))
            except KeyError:
                raise SystemExit(
                    f"{source}: no {MEMBER} in this archive (is it a scikit-learn wheel?)"
                ) from None
    else:
        raw = source.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    digits = []
    for number, line in enumerate(io.StringIO(raw.decode("ascii")), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != SOURCE_SIDE * SOURCE_SIDE + 1:
            raise SystemExit(f"{source}: line {number}: {len(fields)} fields, expected {SOURCE_SIDE**2 + 1}")
        label = int(float(fields[-1]))
        if not 0 <= label <= 9:
            raise SystemExit(f"{source}: line {number}: label {label} out of 0..9")
        digits.append(([float(value) for value in fields[:-1]], label))
    return digits


def _axis(out_side: int, in_side: int) -> list[tuple[int, int, float]]:
    """For each output coordinate: the two input coordinates around it and the weight of the second."""
    scale = in_side / out_side
    weights = []
    for out in range(out_side):
        position = min(max((out + 0.5) * scale - 0.5, 0.0), in_side - 1.0)
        low = int(position)
        high = min(low + 1, in_side - 1)
        weights.append((low, high, position - low))
    return weights


AXIS = _axis(SIDE, SOURCE_SIDE)


def upscale(pixels: list[float]) -> bytes:
    """An 8x8 image of 0..16 values as 28x28 unsigned bytes (bilinear interpolation, 0..255)."""
    out = bytearray(SIDE * SIDE)
    for row, (r0, r1, fr) in enumerate(AXIS):
        for col, (c0, c1, fc) in enumerate(AXIS):
            top = pixels[r0 * SOURCE_SIDE + c0] * (1 - fc) + pixels[r0 * SOURCE_SIDE + c1] * fc
            bottom = pixels[r1 * SOURCE_SIDE + c0] * (1 - fc) + pixels[r1 * SOURCE_SIDE + c1] * fc
            value = (top * (1 - fr) + bottom * fr) * 255 / SOURCE_MAX
            out[row * SIDE + col] = min(255, max(0, int(value + 0.5)))
    return bytes(out)


def idx_images(images: list[bytes]) -> bytes:
    return struct.pack(">4B3I", 0, 0, 0x08, 3, len(images), SIDE, SIDE) + b"".join(images)


def idx_labels(labels: list[int]) -> bytes:
    return struct.pack(">4BI", 0, 0, 0x08, 1, len(labels)) + bytes(labels)


def split(count: int, test_count: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed shuffle of ``range(count)`` (by a hash, so it is the same on every Python), cut in two."""
    order = sorted(range(count), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return sorted(order[test_count:]), sorted(order[:test_count])


def write_gzip(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a scikit-learn wheel, or its digits.csv.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--test-count", type=int, default=360, help="images held out for testing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test shuffle")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        raise SystemExit(f"{args.source}: no such file")

    digits = read_digits(args.source)
    if not 0 < args.test_count < len(digits):
        raise SystemExit(f"--test-count {args.test_count}: must be between 1 and {len(digits) - 1}")
    train, test = split(len(digits), args.test_count, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for prefix, indices in (("train", train), ("t10k", test)):
        write_gzip(
            args.out / f"{prefix}-images-idx3-ubyte.gz", idx_images([upscale(digits[i][0]) for i in indices])
        )
        write_gzip(args.out / f"{prefix}-labels-idx1-ubyte.gz", idx_labels([digits[i][1] for i in indices]))
        print(f"{prefix}: {len(indices)} images of {SIDE}x{SIDE} -> {args.out}/{prefix}-*-ubyte.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
