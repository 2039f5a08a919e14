"""Quantised copies of the slim ONNX export: INT8 and FP16, each checked by accuracy.

Both conversions are onnxruntime's own tools; prunekit writes no quantiser:

* INT8 is static post-training quantisation, `onnxruntime.quantization.quantize_static`, in the QDQ
  format with per-channel weights, signed 8-bit weights and activations (onnxruntime's recommended
  CPU setting), after `quant_pre_process` (shape inference and graph optimisation, as onnxruntime's
  docs advise). Its activation ranges are calibrated (MinMax) on images of the user's data.
* FP16 is `onnxruntime.transformers.float16.convert_float_to_float16`, with float32 inputs and
  outputs kept, so a caller feeds the same tensors as to the FP32 file. That module ships inside
  onnxruntime and is maintained with it; onnxconverter-common's `float16` is the code it came from and
  would be one more dependency for the same function.

A quantised model does not match its FP32 source to a tolerance, so it is checked the way it is used:
on the user's labelled data, by its top-1 accuracy against the FP32 model's and by how often the two
agree on the top-1 class. `QuantizedExport.accuracy` holds those numbers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.config import QUANTIZE_MODES
from prunekit.errors import ConfigError, DataError, ExportError, first_line
from prunekit.onnxrt import cpu_session

CALIBRATION_BATCH = 32  # images per calibration batch (onnxruntime keeps every batch's ranges)
DEFAULT_CALIBRATION_BATCHES = 8

__all__ = [
    "CALIBRATION_BATCH",
    "DEFAULT_CALIBRATION_BATCHES",
    "QUANTIZE_MODES",
    "QuantizedExport",
    "calibration_inputs",
    "check_accuracy",
    "onnx_predictions",
    "quantize",
    "quantized_path",
]


def quantized_path(onnx_path: Path, mode: str) -> Path:
    """model.onnx -> model.int8.onnx (model.fp16.onnx): the quantised copy sits beside its source."""
    onnx_path = Path(onnx_path)
    stem = onnx_path.name.removesuffix(".onnx") if onnx_path.name.endswith(".onnx") else onnx_path.name
    return onnx_path.with_name(f"{stem}.{mode}.onnx")


@dataclass
class QuantizedExport:
    """One quantised file, how it was made, and how its accuracy compares with the FP32 model's."""

    mode: str  # "int8" or "fp16"
    path: Path
    size_bytes: int
    method: dict[str, Any]  # the converter and its settings (calibration images for INT8)
    accuracy: dict[str, Any] = field(default_factory=dict)  # see check_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "method": self.method,
            "accuracy": self.accuracy,
        }


def calibration_inputs(dataset: Any, batches: int, *, seed: int = 0) -> list[np.ndarray]:
    """`batches` batches of CALIBRATION_BATCH images drawn at random (seeded) from `dataset`, which
    yields (image tensor, label) with evaluation transforms. Fewer batches when the data holds fewer;
    less than one whole batch is an error, since its ranges would describe a handful of images."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ConfigError(f"calibration_batches must be an integer >= 1, got {batches!r}")
    n = len(dataset)
    if n < CALIBRATION_BATCH:
        raise DataError(
            f"the calibration set has {n} image(s), fewer than one batch of {CALIBRATION_BATCH}: "
            "give --data with more images"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    whole = min(batches, n // CALIBRATION_BATCH)
    out = []
    for b in range(whole):
        picks = order[b * CALIBRATION_BATCH : (b + 1) * CALIBRATION_BATCH]
        out.append(np.stack([np.asarray(dataset[i][0], dtype=np.float32) for i in picks]))
    return out


def quantize(
    mode: str, source: Path, target: Path, *, calibration: Sequence[np.ndarray] | None = None
) -> QuantizedExport:
    """Write the `mode` copy of the FP32 ONNX file `source` to `target` (written directly: the caller
    stages it). INT8 needs `calibration` batches."""
    if mode == "int8":
        if not calibration:
            raise ConfigError("INT8 quantisation needs calibration data (--data)")
        method = _int8(Path(source), Path(target), calibration)
    elif mode == "fp16":
        method = _fp16(Path(source), Path(target))
    else:
        raise ConfigError(f"unknown quantisation mode {mode!r}: use {' or '.join(QUANTIZE_MODES)}")
    return QuantizedExport(mode, Path(target), os.path.getsize(target), method)


def _int8(source: Path, target: Path, calibration: Sequence[np.ndarray]) -> dict[str, Any]:
    quantization = _import_quantization()
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self._batches = iter(calibration)
            self._name = name

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {self._name: batch}

    name = cpu_session(source, 1).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="prunekit-quant-") as tmp, _quiet_tools():
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quantization.quant_pre_process(str(source), str(prepared))
            quantization.quantize_static(
                str(prepared),
                str(target),
                _Reader(name),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quantization.QuantType.QInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )
        except OSError:
            raise  # a full disk or a write limit: the caller names the file
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise ExportError(f"INT8 quantisation failed: {type(exc).__name__}: {first_line(exc)}") from exc
    images = sum(int(b.shape[0]) for b in calibration)
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "int8",
        "calibration": {"method": "minmax", "batches": len(calibration), "images": images},
    }


def _fp16(source: Path, target: Path) -> dict[str, Any]:
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ExportError(f"FP16 conversion needs onnx and onnxruntime: {first_line(exc)}") from exc
    with _quiet_tools():
        try:
            converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"FP16 conversion failed: {type(exc).__name__}: {first_line(exc)}") from exc
    onnx.save(converted, str(target))
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "io": "float32"}


def onnx_predictions(
    paths: dict[str, Path], batches: Iterable[tuple[Any, Any]], threads: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(top-1 class per example of each ONNX model in `paths`, label per example) over `batches`, in one
    pass: each batch runs through every model, so the data is read once and never held whole."""
    sessions = {name: cpu_session(path, threads) for name, path in paths.items()}
    inputs = {name: s.get_inputs()[0].name for name, s in sessions.items()}
    preds: dict[str, list[np.ndarray]] = {name: [] for name in paths}
    labels = []
    for x, y in batches:
        feed = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        for name, session in sessions.items():
            logits = session.run(None, {inputs[name]: feed})[0]
            if not np.isfinite(logits).all():
                raise ExportError(f"{Path(paths[name]).name} gives non-finite outputs on the data")
            preds[name].append(np.asarray(logits).argmax(1))
        labels.append(np.asarray(y))
    if not labels:
        raise DataError("the data has no validation images to check the quantised model on")
    return {name: np.concatenate(p) for name, p in preds.items()}, np.concatenate(labels)


def check_accuracy(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Top-1 of the FP32 reference and the quantised candidate, the drop in points, and the fraction of
    examples on which both predict the same class."""
    fp32 = float((reference == labels).mean())
    top1 = float((candidate == labels).mean())
    return {
        "examples": int(labels.shape[0]),
        "fp32_top1": fp32,
        "top1": top1,
        "drop_points": 100.0 * (fp32 - top1),
        "agreement": float((reference == candidate).mean()),
    }


def _import_quantization() -> Any:
    try:
        import onnxruntime.quantization as quantization
    except ImportError as exc:
        raise ExportError(
            f"INT8 quantisation needs onnxruntime's quantization tools: {first_line(exc)}"
        ) from exc
    return quantization


@contextlib.contextmanager
def _quiet_tools() -> Iterator[None]:
    """onnxruntime's quantisation tools log progress and warnings; the user sees prunekit's lines."""
    import logging

    from prunekit.export import quiet_output

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet_output():
            yield
    finally:
        root.setLevel(level)
