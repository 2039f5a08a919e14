"""Build prunekit's built-in example dataset: a class-balanced Fashion-MNIST subset.

Source: Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`), which installs the
official idx files in /usr/share/datasets/fashion-mnist/. Run from the repository root:

    python scripts/make_builtin_dataset.py

The output is byte-for-byte reproducible (fixed seed, fixed zip timestamps), so the sha256 written into
prunekit/_data/README.md identifies the subset.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped idx file (big-endian header: magic, counts, then uint8 data)."""
    raw = gzip.decompress(path.read_bytes())
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise SystemExit(f"{path}: magic number {found}, expected {magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` random examples of every class, in their original order."""
    picked = []
    for c in range(len(CLASSES)):
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < per_class:
            raise SystemExit(f"class {c} has only {len(candidates)} examples, {per_class} requested")
        picked.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so the file's hash is reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


README = """\
# Built-in example dataset: a Fashion-MNIST subset

`fashion_mnist_subset.npz` is what `--data builtin` loads: {n_train} training and {n_test} test images
({train_pc} and {test_pc} per class, class-balanced), 28x28 grayscale, 10 classes.

- Source: Fashion-MNIST by Zalando Research, https://github.com/zalandoresearch/fashion-mnist, as packaged
  by Debian (`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist/).
- Licence: MIT (Expat), reproduced in full below as the licence requires.
- Attribution: Han Xiao, Kashif Rasul, Roland Vollgraf. *Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms.* arXiv:1708.07747, 2017.

## How it was made
    python scripts/make_builtin_dataset.py \\
        --train-per-class {train_pc} --test-per-class {test_pc} --seed {seed}

For every class, {train_pc} images drawn at random (numpy `default_rng({seed})`, without replacement) from
the official training split and {test_pc} from the official test split, kept in their original order.
The script writes the file with fixed zip timestamps, so re-running it gives the same bytes.

## Contents (uint8 unless noted)
| array | shape | meaning |
|---|---|---|
| `train_images` | ({n_train}, 28, 28) | training images |
| `train_labels` | ({n_train},) | class index 0-9 |
| `test_images` | ({n_test}, 28, 28) | test images (used as the validation split) |
| `test_labels` | ({n_test},) | class index 0-9 |
| `classes` | (10,) str | class names in label order |
| `mean`, `std` | () float32 | pixel mean and std of `train_images` scaled to [0, 1] |

Pixel statistics of the training subset: mean {mean:.4f}, std {std:.4f}.

## Checksums (sha256)
- `fashion_mnist_subset.npz`: `{npz_sha}`
{source_shas}

## Licence (from the Debian package's copyright file)
```
Copyright 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files (the "Software"),
to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included
in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("prunekit/_data"))
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = {
        "train_images": args.source / "train-images-idx3-ubyte.gz",
        "train_labels": args.source / "train-labels-idx1-ubyte.gz",
        "test_images": args.source / "t10k-images-idx3-ubyte.gz",
        "test_labels": args.source / "t10k-labels-idx1-ubyte.gz",
    }
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"{path} not found: apt-get install dataset-fashion-mnist")
    data = {
        key: read_idx(path, IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC)
        for key, path in files.items()
    }

    rng = np.random.default_rng(args.seed)
    train_idx = balanced_subset(data["train_labels"], args.train_per_class, rng)
    test_idx = balanced_subset(data["test_labels"], args.test_per_class, rng)
    train_images = data["train_images"][train_idx]
    scaled = train_images.astype(np.float64) / 255.0
    arrays = {
        "train_images": train_images,
        "train_labels": data["train_labels"][train_idx],
        "test_images": data["test_images"][test_idx],
        "test_labels": data["test_labels"][test_idx],
        "classes": np.array(CLASSES),
        "mean": np.float32(scaled.mean()),
        "std": np.float32(scaled.std()),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "fashion_mnist_subset.npz"
    write_npz(npz, arrays)
    source_shas = "\n".join(f"- source `{p.name}`: `{sha256(p)}`" for p in files.values())
    (args.out / "README.md").write_text(
        README.format(
            n_train=len(train_idx),
            n_test=len(test_idx),
            train_pc=args.train_per_class,
            test_pc=args.test_per_class,
            seed=args.seed,
            mean=float(arrays["mean"]),
            std=float(arrays["std"]),
            npz_sha=sha256(npz),
            source_shas=source_shas,
        )
    )
    print(f"wrote {npz} ({npz.stat().st_size / 1e6:.2f} MB, sha256 {sha256(npz)})")


if __name__ == "__main__":
    main()
