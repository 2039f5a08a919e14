"""Images per second of the training loader over one image folder: decoding every epoch (the per-image
pipeline) against decoding once into memory (prunekit's default for small inputs), side by side.

    python benchmarks/data_path.py --data /tmp/cifar10 --out benchmarks/results/data_path.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from prunekit import data as pk_data


def images_per_s(loader: DataLoader, batches: int) -> float:
    start, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(loader):
        n += x.shape[0]
        if i + 1 >= batches:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/cifar10")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/data_path.json")
    args = ap.parse_args()
    shape, stats = (3, 32, 32), {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}
    common = {"input_shape": shape, "batch_size": args.batch_size, "workers": args.workers, **stats}
    start = time.perf_counter()
    decoded = pk_data.image_folder_loaders(args.data, **common).train
    decode_seconds = time.perf_counter() - start
    limit, pk_data.DECODE_LIMIT_BYTES = pk_data.DECODE_LIMIT_BYTES, 0  # the per-image pipeline, as before
    per_image = pk_data.image_folder_loaders(args.data, **common).train
    pk_data.DECODE_LIMIT_BYTES = limit
    assert isinstance(decoded.dataset, pk_data.DecodedImages) and not isinstance(
        per_image.dataset, pk_data.DecodedImages
    )
    runs: dict[str, list[float]] = {"per_image": [], "decoded": []}
    for _ in range(args.repeats):  # interleaved
        runs["per_image"].append(images_per_s(per_image, args.batches))
        runs["decoded"].append(images_per_s(decoded, args.batches))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    result = {
        "command": "python benchmarks/data_path.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "decode_once_seconds": decode_seconds,
        "images_per_s_median": med,
        "ratio": med["decoded"] / med["per_image"],
        "runs": runs,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
