"""Compare the dynamo and TorchScript ONNX exporters through prunekit.export.export_onnx.

For each model and exporter: export time (warm, best of --repeat), onnxruntime parity, file size,
node count and onnxruntime latency (CPU, fixed threads). The first export of each exporter in the
process is reported separately as the cold-start cost (imports, first tracing).

    .venv/bin/python benchmarks/onnx_export_check.py            # resnet18, mobilenet_v3_small
    .venv/bin/python benchmarks/onnx_export_check.py --big      # also vgg16 (528 MB, single file)
    .venv/bin/python benchmarks/onnx_export_check.py --json     # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from prunekit.export import export_onnx
from prunekit.testing import calibrate_batchnorm_

MODELS = [("resnet18", 32), ("resnet18", 224), ("mobilenet_v3_small", 64), ("mobilenet_v3_small", 224)]
BIG = [("vgg16", 224)]


def ort_latency_ms(path: Path, shape: tuple[int, int, int], batch: int, runs: int = 20) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also export vgg16 at 224x224")
    parser.add_argument("--repeat", type=int, default=2, help="warm exports per case (best is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # cold start: the first export per exporter pays for imports and first-time setup
        cold = {}
        for exporter, dynamo in (("dynamo", True), ("torchscript", False)):
            torch.manual_seed(0)
            tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            start = time.perf_counter()
            export_onnx(tiny, out / f"tiny_{exporter}.onnx", input_shape=(3, 8, 8), dynamo=dynamo)
            cold[exporter] = time.perf_counter() - start
        for name, side in MODELS + (BIG if args.big else []):
            shape = (3, side, side)
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None)
            calibrate_batchnorm_(model, shape)
            for exporter, dynamo in (("dynamo", True), ("torchscript", False)):
                path = out / f"{name}_{side}_{exporter}.onnx"
                best = None
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    result = export_onnx(model, path, input_shape=shape, dynamo=dynamo)
                    total = time.perf_counter() - start
                    if best is None or result.export_seconds < best[0].export_seconds:
                        best = (result, total)
                result, total = best
                proto = onnx.load(str(path), load_external_data=False)
                rows.append(
                    {
                        "model": name,
                        "input": side,
                        "exporter": exporter,
                        "export_s": round(result.export_seconds, 3),
                        "total_s": round(total, 3),
                        "max_abs_diff": result.max_abs_diff,
                        "max_abs_ref": result.max_abs_ref,
                        "size_mb": round(result.size_bytes / 1e6, 2),
                        "nodes": len(proto.graph.node),
                        "files_in_dir": sorted(p.name for p in out.iterdir() if p.name.startswith(name)),
                        "ort_ms_b1": round(ort_latency_ms(path, shape, 1), 3),
                        "ort_ms_b8": round(ort_latency_ms(path, shape, 8, runs=10), 3),
                    }
                )
                del proto
                path.unlink()
    doc = {
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "cold_first_export_s": {k: round(v, 3) for k, v in cold.items()},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"torch {doc['torch']}, onnx {doc['onnx']}, onnxruntime {doc['onnxruntime']}")
    print(f"cold first export (tiny model, incl. imports): {doc['cold_first_export_s']}")
    print(
        "model               input exporter     export_s total_s  max|diff|  max|ref|  MB     "
        "nodes ort_b1_ms ort_b8_ms"
    )
    for r in rows:
        print(
            f"{r['model']:<19} {r['input']:>5} {r['exporter']:<12} {r['export_s']:>8.2f} "
            f"{r['total_s']:>7.2f} {r['max_abs_diff']:>9.2e} {r['max_abs_ref']:>9.3g} "
            f"{r['size_mb']:>6.1f} {r['nodes']:>6} {r['ort_ms_b1']:>9.2f} {r['ort_ms_b8']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
