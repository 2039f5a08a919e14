"""ONNX export with ``onnx.checker`` and an onnxruntime parity check.

One public entry point, :func:`export_onnx`. It exports a classifier with a dynamic batch axis
into a single self-contained ``.onnx`` file, validates it and compares onnxruntime with PyTorch.

Guarantees:

* The file at ``path`` is written atomically through :func:`prunekit.fileio.atomic_path`: the
  export goes to a hidden temporary file in the same directory, which is checked, verified, flushed
  to disk and only then moved onto ``path`` with ``os.replace``. On any failure no temporary file
  (nor an external-data sidecar of one) is left behind and an existing file at ``path`` is untouched.
* Nothing is printed. The exporters write progress, warnings and (from C++) whole graphs to
  stdout/stderr; all of it is captured at the file-descriptor level while exporting and only
  summarised in the one-line error message when the export fails. Note that this redirection is
  process-wide for its duration (other threads printing at that moment are silenced too).
* The caller's model is left as it was: training flags (per module) and device are restored.

Exporters (torch 2.14): the dynamo exporter (``torch.export`` + onnxscript) is the default. It
supports opsets 18 and up; below 18 it silently bumps the opset to 18, so lower opsets go to the
TorchScript exporter, which is deprecated and capped at opset 20. When ``dynamo`` is ``None`` and the
dynamo exporter fails, the TorchScript exporter is tried (opset capped at 20); the result records
which one produced the file and why the fallback happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit import parity
from prunekit.errors import ExportError, VerificationError
from prunekit.fileio import atomic_path
from prunekit.onnxrt import cpu_session

__all__ = [
    "DYNAMO_MIN_OPSET",
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "TORCHSCRIPT_MAX_OPSET",
    "ExportResult",
    "export_onnx",
    "max_opset",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS_NAME = "batch"
MIN_OPSET = 7  # lowest opset of the TorchScript exporter (and of onnxruntime)
DYNAMO_MIN_OPSET = 18  # the dynamo exporter bumps anything lower to 18
TORCHSCRIPT_MAX_OPSET = 20
ORT_THREADS = 2
# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
_PROTO_LIMIT = 2**31
_WEIGHTS_LIMIT = _PROTO_LIMIT - 64 * 2**20
_MESSAGE_CHARS = 400
_SIDECAR = ".data"  # the exporters' external-data file is <model file>.data
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CLASS_REPR = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how well onnxruntime matched PyTorch."""

    path: Path
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    export_batch: int
    verify_batch: int
    max_abs_diff: float
    max_abs_ref: float
    size_bytes: int
    input_shape: tuple[int, int, int]
    rtol: float = 1e-4
    export_seconds: float = 0.0
    fallback_reason: str | None = None  # why the dynamo exporter was not used, if it was tried
    export_warnings: tuple[str, ...] = field(default_factory=tuple)  # e.g. TorchScript TracerWarnings

    @property
    def tolerance(self) -> float:
        """The absolute tolerance that ``max_abs_diff`` was held to."""
        return parity.tolerance(self.rtol, self.max_abs_ref)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["input_shape"] = list(self.input_shape)
        data["export_warnings"] = list(self.export_warnings)
        data["tolerance"] = self.tolerance
        return data


def max_opset() -> int:
    """The highest opset the installed ``onnx`` package knows."""
    onnx = _import("onnx")
    return int(onnx.defs.onnx_opset_version())


def export_onnx(
    model: nn.Module,
    path: Path | str,
    *,
    input_shape: tuple[int, int, int],
    opset: int = 18,
    export_batch: int = 2,
    verify_batch: int = 3,
    rtol: float = 1e-4,
    dynamo: bool | None = None,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
    staged: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path``, check it and verify it against PyTorch.

    Args:
        model: a classifier taking one float32 tensor ``(N, C, H, W)``; exported in eval mode on CPU.
        path: the ``.onnx`` file to write (its directory must exist).
        input_shape: ``(C, H, W)`` of one sample.
        opset: ONNX opset; 18 and up for the dynamo exporter, 7 to 20 for TorchScript.
        export_batch: batch size of the example input used for export (>= 2; batch 1 can bake a
            static batch into the graph).
        verify_batch: batch size for the parity check; must differ from ``export_batch``. Batch 1
            is checked as well.
        rtol: parity passes when ``max|onnx - torch| <= rtol * max|torch|`` (see :mod:`prunekit.parity`).
        dynamo: ``True`` dynamo exporter only, ``False`` TorchScript only, ``None`` dynamo with a
            TorchScript fallback (or TorchScript directly for opsets below 18).
        seed: seed of the random example and verification inputs.
        inputs: an optional real batch ``(N, C, H, W)`` checked in addition to the random ones.
        staged: ``path`` is already a staging file from :func:`staging` that the caller moves into
            place (together with another file); it is written directly, with no second temporary.

    Raises:
        ConfigError: ``path`` cannot be written (missing directory, a directory, read-only).
        ExportError: bad arguments, model too large, exporter or checker failure.
        VerificationError: onnxruntime disagrees with PyTorch or the batch axis is not dynamic.
    """
    path = Path(path)
    shape = _check_shape(input_shape)
    _check_numbers(export_batch, verify_batch, seed, rtol)
    real = _check_inputs(inputs, shape)
    plan = _plan_exporters(opset, dynamo)
    _import("onnx")
    _import("onnxruntime")
    _check_weights_size(model)

    with staging(path) if not staged else contextlib.nullcontext(path) as tmp:
        with _prepared(model):
            gen = torch.Generator().manual_seed(seed)
            example = torch.randn((export_batch, *shape), generator=gen)
            verify = torch.randn((verify_batch, *shape), generator=gen)
            checks = [(f"random batch of {verify_batch}", verify)]
            if verify_batch != 1:
                checks.append(("random batch of 1", verify[:1].clone()))
            if real is not None:
                checks.append((f"given batch of {real.shape[0]}", real))
            refs = [_checked_reference(model, label, x) for label, x in checks]
            exporter, seconds, fallback, notes = _export_with_fallback(model, example, tmp, plan)
        actual_opset = _validate_file(tmp, exporter)
        diff, ref_max = _verify_parity(tmp, checks, refs, rtol, exporter, actual_opset, fallback)

    return ExportResult(
        path=path,
        opset=actual_opset,
        exporter=exporter,
        export_batch=export_batch,
        verify_batch=verify_batch,
        max_abs_diff=diff,
        max_abs_ref=ref_max,
        size_bytes=path.stat().st_size,
        input_shape=shape,
        rtol=float(rtol),
        export_seconds=seconds,
        fallback_reason=fallback,
        export_warnings=notes,
    )


def staging(path: Path) -> contextlib.AbstractContextManager[Path]:
    """The temporary file an export goes to before it replaces `path` (see fileio.atomic_path). A
    caller that stages the export together with another file uses this and `export_onnx(staged=True)`."""
    return atomic_path(Path(path), suffix=".tmp.onnx", fsync=True, sidecars=(_SIDECAR,))


# --------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ExportError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_numbers(export_batch: object, verify_batch: object, seed: object, rtol: object) -> None:
    _check_int("export_batch", export_batch, minimum=2)
    _check_int("verify_batch", verify_batch, minimum=1)
    _check_int("seed", seed, minimum=0)
    if verify_batch == export_batch:
        raise ExportError(
            f"verify_batch ({verify_batch}) must differ from export_batch ({export_batch}) "
            "so that the parity check proves the batch axis is dynamic"
        )
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and 0 < rtol < 1):
        raise ExportError(f"rtol must be a number in (0, 1), got {rtol!r}")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ExportError(f"input_shape must be three positive integers (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _check_inputs(inputs: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor | None:
    if inputs is None:
        return None
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ExportError("inputs must be a floating-point tensor of shape (N, C, H, W)")
    if inputs.dim() != 4 or tuple(inputs.shape[1:]) != shape or inputs.shape[0] < 1:
        raise ExportError(
            f"inputs have shape {tuple(inputs.shape)}; expected (N, {shape[0]}, {shape[1]}, {shape[2]})"
        )
    return inputs.detach().to(device="cpu", dtype=torch.float32)


def _plan_exporters(opset: object, dynamo: bool | None) -> list[tuple[str, int]]:
    """Which exporters to try, in order, with the opset each should use."""
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if dynamo is not None and not isinstance(dynamo, bool):
        raise ExportError(f"dynamo must be True, False or None, got {dynamo!r}")
    top = max_opset()
    if dynamo is not None:
        ranges = {"dynamo": (DYNAMO_MIN_OPSET, top), "TorchScript": (MIN_OPSET, TORCHSCRIPT_MAX_OPSET)}
        chosen, other = ("dynamo", "TorchScript") if dynamo else ("TorchScript", "dynamo")
        (lo, hi), (other_lo, other_hi) = ranges[chosen], ranges[other]
        if not lo <= opset <= hi:
            raise ExportError(
                f"opset {opset} is not supported by the {chosen} exporter (supported: {lo}-{hi}); "
                f"pick one in that range or use the {other} exporter for opsets {other_lo}-{other_hi}"
            )
        return [(chosen.lower(), opset)]
    if not MIN_OPSET <= opset <= top:
        raise ExportError(
            f"opset {opset} is out of the supported range {MIN_OPSET}-{top} "
            f"(the default dynamo exporter needs {DYNAMO_MIN_OPSET}-{top})"
        )
    if opset < DYNAMO_MIN_OPSET:
        return [("torchscript", opset)]
    return [("dynamo", opset), ("torchscript", min(opset, TORCHSCRIPT_MAX_OPSET))]


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _check_weights_size(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(model))
    if nbytes >= _WEIGHTS_LIMIT:
        raise ExportError(
            f"the model holds {nbytes / 2**30:.2f} GiB of weights; a self-contained .onnx file "
            "is limited to 2 GiB: prune it further or export a smaller model"
        )


def _sidecar(tmp: Path) -> Path:
    """Where an exporter puts external data for ``tmp`` (prunekit expects none)."""
    return tmp.with_name(tmp.name + _SIDECAR)


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the '{name}' package: pip install {name}") from exc


# --------------------------------------------------------------------------- model handling


@contextlib.contextmanager
def _prepared(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode on the CPU; restore training flags and device afterwards."""
    tensors = _tensors(model)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ExportError(f"the model is spread over several devices ({names}); move it to one")
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ExportError(
            f"ONNX export needs a float32 model, this one has {names} tensors; call model.float()"
        )
    device = devices.pop() if devices else torch.device("cpu")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if device.type != "cpu":
            model.to("cpu")
        yield
    finally:
        if device.type != "cpu":
            model.to(device)
        for m, flag in flags:
            m.training = flag


def _checked_reference(model: nn.Module, label: str, x: torch.Tensor) -> list[np.ndarray]:
    """PyTorch's eval output; a model that cannot run is reported before the slow export."""
    try:
        return _reference(model, x)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise ExportError(
            f"the model fails in PyTorch on a {label} of shape {tuple(x.shape)}: {_summarize(exc)}; "
            "export needs a model that accepts any batch size"
        ) from exc


def _reference(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [t.detach().cpu().float().numpy() for t in _flatten_outputs(out)]


def _flatten_outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise ExportError(
        f"the model returns {type(out).__name__}; ONNX export expects a tensor (or a tuple of tensors)"
    )


# --------------------------------------------------------------------------- quiet export


class _Captured:
    """What the exporter wrote to stdout/stderr and the warnings it raised."""

    def __init__(self) -> None:
        self.text = ""
        self.warnings: list[warnings.WarningMessage] = []


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _quiet() -> Iterator[_Captured]:
    """Capture everything written to stdout/stderr (Python and C level) and all warnings."""
    cap = _Captured()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_stdio()
    buf = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        saved: list[tuple[int, int]] = []
        for fd in (1, 2):
            try:
                copy = os.dup(fd)
            except OSError:
                continue
            try:
                os.dup2(sink.fileno(), fd)
            except OSError:
                os.close(copy)
                continue
            saved.append((fd, copy))
        try:
            with (
                contextlib.redirect_stdout(buf),
                contextlib.redirect_stderr(buf),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("always")
                try:
                    yield cap
                finally:
                    cap.warnings = list(caught)
        finally:
            _flush_c_stdio()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            cap.text = buf.getvalue() + sink.read().decode("utf-8", errors="replace")


quiet_output = _quiet  # for other onnx tools (the quantisers) that print and warn


def _one_line(text: str, limit: int = _MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summarize(exc: BaseException, captured: str = "") -> str:
    """One line describing an exporter failure (the root cause, not the boilerplate)."""
    text = _ANSI.sub("", str(exc))
    line = ""
    marker = text.find("## Exception summary")
    if marker >= 0:  # dynamo exporter errors: the cause follows this heading
        rest = [ln.strip() for ln in text[marker:].splitlines()[1:]]
        line = next((ln for ln in rest if ln), "")
    if not line:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        tail = [ln.strip() for ln in _ANSI.sub("", captured).splitlines() if ln.strip()]
        line = tail[-1] if tail else ""
    line = _CLASS_REPR.sub(r"\1", line)
    name = type(exc).__name__
    if not line.startswith(name) and not re.match(r"^\w+(Error|Exception|Violation)\b", line):
        line = f"{name}: {line}" if line else name
    return _one_line(line)


def _run_exporter(name: str, model: nn.Module, example: torch.Tensor, tmp: Path, opset: int) -> None:
    common: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
        "verbose": False,
    }
    if name == "dynamo":
        # The string form becomes Dim.DYNAMIC: torch.export fails loudly if the model pins the
        # batch. torch.export.Dim("batch") instead silently exports a static batch of 2.
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=({0: BATCH_AXIS_NAME},),
            external_data=False,
            report=False,
            **common,
        )
    else:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS_NAME}, OUTPUT_NAME: {0: BATCH_AXIS_NAME}},
            do_constant_folding=True,
            **common,
        )


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def _write_failure(exc: BaseException) -> OSError | None:
    """The OSError of a failed write (a full disk, a size limit) behind `exc`, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _export_with_fallback(
    model: nn.Module, example: torch.Tensor, tmp: Path, plan: list[tuple[str, int]]
) -> tuple[str, float, str | None, tuple[str, ...]]:
    """Try the planned exporters in order; return (exporter, seconds, fallback reason, warnings)."""
    failures: list[str] = []
    for name, opset in plan:
        captured = _Captured()
        start = time.perf_counter()
        try:
            with _quiet() as captured:
                _run_exporter(name, model, example, tmp, opset)
            _check_written(tmp)
        except Exception as exc:  # noqa: BLE001 - exporters raise anything; summarised below
            write_failure = _write_failure(exc)
            if write_failure is not None:  # the file system, not the exporter: another one would fail too
                raise write_failure from exc
            failures.append(f"{name} exporter: {_summarize(exc, captured.text)}")
            with contextlib.suppress(FileNotFoundError):
                _sidecar(tmp).unlink()
            continue
        seconds = time.perf_counter() - start
        notes = _export_notes(captured)
        fallback = "; ".join(failures) or None
        return name, seconds, fallback, notes
    hint = ""
    if plan[-1][0] == "torchscript" and plan[-1][1] < DYNAMO_MIN_OPSET:
        hint = f" (opset >= {DYNAMO_MIN_OPSET} allows the dynamo exporter)"
    raise ExportError(f"ONNX export failed: {'; '.join(failures)}{hint}")


def _check_written(tmp: Path) -> None:
    if not tmp.exists() or tmp.stat().st_size == 0:
        raise ExportError("the exporter wrote no file")
    if _sidecar(tmp).exists():
        raise ExportError("the exporter wrote external data; expected one self-contained file")


def _export_notes(captured: _Captured) -> tuple[str, ...]:
    """Warnings worth keeping: TorchScript TracerWarnings mean the trace may not generalise."""
    notes: list[str] = []
    for w in captured.warnings:
        if w.category.__name__ == "TracerWarning":
            msg = _one_line(f"TracerWarning: {w.message}", 200)
            if msg not in notes:
                notes.append(msg)
    return tuple(notes)


# --------------------------------------------------------------------------- validation


def _graph_uses_external_data(graph: Any) -> bool:
    onnx = _import("onnx")
    helper = onnx.external_data_helper
    if any(helper.uses_external_data(t) for t in graph.initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and helper.uses_external_data(attr.t):
                return True
            if any(helper.uses_external_data(t) for t in attr.tensors):
                return True
            if attr.HasField("g") and _graph_uses_external_data(attr.g):
                return True
            if any(_graph_uses_external_data(g) for g in attr.graphs):
                return True
    return False


def _validate_file(tmp: Path, exporter: str) -> int:
    """Structural checks on the written file; returns its default-domain opset."""
    onnx = _import("onnx")
    size = tmp.stat().st_size
    if size >= _PROTO_LIMIT:
        raise ExportError(
            f"the exported file is {size / 2**30:.2f} GiB; a self-contained .onnx file is limited "
            "to 2 GiB: prune it further or export a smaller model"
        )
    try:
        proto = onnx.load(str(tmp), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common type
        raise ExportError(f"the {exporter} exporter wrote an unreadable file: {_summarize(exc)}") from exc
    if _graph_uses_external_data(proto.graph):
        raise ExportError(f"the {exporter} exporter wrote external data; expected one self-contained file")
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    del proto
    try:
        onnx.checker.check_model(str(tmp))
    except Exception as exc:  # noqa: BLE001 - ValidationError and C++ errors
        raise ExportError(f"onnx.checker rejected the {exporter} export: {_summarize(exc)}") from exc
    if not opsets:
        raise ExportError(f"the {exporter} export declares no default-domain opset")
    return int(opsets[0])


def _verify_parity(
    tmp: Path,
    checks: list[tuple[str, torch.Tensor]],
    refs: list[list[np.ndarray]],
    rtol: float,
    exporter: str,
    opset: int,
    fallback: str | None,
) -> tuple[float, float]:
    """Run onnxruntime on each check batch; return (max |diff|, max |reference|)."""
    where = f"{exporter} exporter, opset {opset}"
    if fallback:
        where += f"; fallback after {_one_line(fallback, 160)}"
    with _quiet():
        session = cpu_session(tmp, ORT_THREADS, what=f"the {exporter} export (opset {opset})")
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise ExportError(f"the exported graph has {len(graph_inputs)} inputs; expected 1 ({where})")
    batch_dim = graph_inputs[0].shape[0] if graph_inputs[0].shape else None
    if isinstance(batch_dim, int):
        raise VerificationError(
            f"the exported graph has a static batch of {batch_dim}: the model pins the batch size "
            f"(for example a reshape with a constant batch) ({where})"
        )
    name = graph_inputs[0].name
    max_diff = 0.0
    max_ref = 0.0
    worst = checks[0][0]
    for (label, x), ref in zip(checks, refs, strict=True):
        batch = x.shape[0]
        try:
            outs = session.run(None, {name: np.ascontiguousarray(x.numpy())})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VerificationError(
                f"onnxruntime failed on a {label}: {_summarize(exc)} "
                f"(is the batch size baked into the graph?) ({where})"
            ) from exc
        if len(outs) != len(ref):
            raise VerificationError(f"onnxruntime returned {len(outs)} outputs, PyTorch {len(ref)} ({where})")
        for got, want in zip(outs, ref, strict=True):
            got = np.asarray(got)
            if not got.shape or got.shape[0] != batch or not want.shape or want.shape[0] != batch:
                raise VerificationError(
                    f"output shape {tuple(got.shape)} on a {label}: the batch axis is not dynamic "
                    f"(the output's first axis must follow the batch size) ({where})"
                )
            if got.shape != want.shape:
                raise VerificationError(
                    f"onnxruntime output shape {tuple(got.shape)} differs from PyTorch's "
                    f"{tuple(want.shape)} on a {label} ({where})"
                )
            if not np.isfinite(want).all():
                raise VerificationError(f"PyTorch output on a {label} is not finite ({where})")
            if not np.isfinite(got).all():
                raise VerificationError(f"onnxruntime output on a {label} is not finite ({where})")
            if want.size:
                diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                if diff > max_diff:
                    max_diff, worst = diff, label
                max_ref = max(max_ref, float(np.max(np.abs(want))))
    result = parity.Parity(max_diff, max_ref, rtol)
    if not result.ok:
        raise VerificationError(
            f"onnxruntime differs from PyTorch on a {worst}: {result.describe()} ({where})"
        )
    return max_diff, max_ref
