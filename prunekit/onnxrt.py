"""The one way prunekit opens an ONNX file in onnxruntime: on the CPU, with a fixed thread count.

Used by the export parity check, by latency measurement and by the latency benchmark, so that all
of them run the graph under the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prunekit.errors import ExportError, first_line

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

__all__ = ["cpu_session"]


def cpu_session(
    path: str | Path, threads: int, *, what: str | None = None, spinning: bool = True
) -> InferenceSession:
    """An onnxruntime CPU session on `path` with `threads` intra-op threads and one inter-op thread.

    onnxruntime logs errors only, so its warnings stay off the user's terminal. `what` names the
    file in the error message (default: its path). `spinning=False` stops the session's threads from
    busy-waiting after a call: needed when several sessions are timed in turn, where one's spinning
    threads would steal the cores from the next.

    Raises:
        ExportError: onnxruntime is not installed or cannot load the file (one-line reason).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(
            "running ONNX files needs the 'onnxruntime' package: pip install onnxruntime"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load {what or path}: {first_line(err)}") from err
