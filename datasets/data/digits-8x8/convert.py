#!/usr/bin/env python3
"""Converts the 1,797 handwritten digits that scikit-learn ships into the IDX files `hylo-train`
reads (`--dataset mnist --data-dir datasets/data/digits-8x8`).

Run once (no download at run time; the outputs are committed beside this script):

    pip download --no-deps scikit-learn==1.9.1 -d /tmp/sklearn
    python3 datasets/data/digits-8x8/convert.py /tmp/sklearn/scikit_learn-1.9.1-*.whl

The wheel's `sklearn/datasets/data/digits.csv.gz` holds one digit per line: 64 pixel values
(0-16, row-major 8x8) and the label last. Per class, every fifth digit in file order (the 5th,
10th, ...) goes to the held-out split (`t10k-*`, 355 images), the rest to the training split
(`train-*`, 1,442 images); pixel values are scaled to bytes as min(255, 16 v). Each file is
gzipped IDX (magic 0x803 images, 0x801 labels, big-endian sizes).
"""

import gzip
import io
import struct
import sys
import zipfile

CSV = "sklearn/datasets/data/digits.csv.gz"


def rows(wheel):
    with zipfile.ZipFile(wheel) as z:
        text = gzip.decompress(z.read(CSV)).decode()
    for line in text.splitlines():
        values = [int(float(v)) for v in line.split(",")]
        if len(values) != 65 or not all(0 <= v <= 16 for v in values[:-1]):
            raise SystemExit(f"{CSV}: expected 64 pixels in 0..16 and a label, got {line[:80]}")
        yield values[:-1], values[-1]


def write(path, magic, dims, data):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    # mtime 0: the same input gives the same bytes.
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
        f.write(header + bytes(data))
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: convert.py SCIKIT_LEARN_WHEEL")
    seen = {}
    splits = {"train": ([], []), "t10k": ([], [])}
    for pixels, label in rows(sys.argv[1]):
        k = seen.get(label, 0) + 1
        seen[label] = k
        images, labels = splits["t10k" if k % 5 == 0 else "train"]
        images.extend(min(255, 16 * v) for v in pixels)
        labels.append(label)
    if sum(seen.values()) != 1797 or sorted(seen) != list(range(10)):
        raise SystemExit(f"expected 1,797 digits of the classes 0-9, got {seen}")
    out = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    for split, (images, labels) in splits.items():
        n = len(labels)
        write(f"{out}/{split}-images-idx3-ubyte.gz", 0x803, [n, 8, 8], images)
        write(f"{out}/{split}-labels-idx1-ubyte.gz", 0x801, [n], labels)
        print(f"{split}: {n} digits")


if __name__ == "__main__":
    main()
