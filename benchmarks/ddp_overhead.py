"""1 vs 2 CPU processes (torchrun, gloo) fine-tuning on the same global batch: the cost of going
distributed, measured side by side.

On a 2-core machine this measures overhead, not speedup: one process gets both cores (2 intra-op
threads), two processes get one core each, so any gain from splitting the batch is cancelled by the
halved threads, and what remains is the all-reduce and the extra process. Runs interleave (1, 2, 1, 2,
...) so that noise on a shared machine hits both alike; the medians are reported.

    python benchmarks/ddp_overhead.py --out benchmarks/results/ddp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def run_once(
    gated: Path, workdir: Path, processes: int, global_batch: int, steps: int, distill: float
) -> dict:
    per_process = global_batch // processes
    args = ["finetune", str(gated), "-o", str(workdir / f"tuned{processes}.pt"), "--data", "builtin"]
    args += [
        "--target-macs",
        "0.5",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        str(steps),
        "--batch-size",
        str(per_process),
    ]
    args += ["--workers", "0", "--distill", str(distill), "--json"]
    threads = max(1, (os.cpu_count() or 2) // processes)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [str(BIN / "prunekit"), *args]
    else:
        command = [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "prunekit",
            *args,
        ]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-2000:]}")
    epoch = next(
        json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"event": "epoch"')
    )
    return {"images_per_s": epoch["images_per_s"], "train_seconds": epoch["seconds"], "wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distill", type=float, default=0.7)
    ap.add_argument("--out", default="benchmarks/results/ddp_overhead.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gated = work / "gated.pt"
        subprocess.run(
            [
                str(BIN / "prunekit"),
                "gate",
                "resnet18",
                "--num-classes",
                "10",
                "--input-shape",
                "32",
                "-o",
                str(gated),
            ],
            check=True,
            capture_output=True,
        )
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for processes in (1, 2):
                runs[processes].append(
                    run_once(gated, work, processes, args.global_batch, args.steps, args.distill)
                )
                print(processes, runs[processes][-1], flush=True)
    summary = {
        str(p): {
            k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "train_seconds", "wall_seconds")
        }
        for p, rs in runs.items()
    }
    result = {
        "command": "python benchmarks/ddp_overhead.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": "resnet18, 3x32x32, built-in data, gated, decide_at 0.2",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "median": summary,
        "ratio_2_over_1_images_per_s": summary["2"]["images_per_s"] / summary["1"]["images_per_s"],
        "runs": {str(p): rs for p, rs in runs.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
