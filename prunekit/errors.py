"""Errors a user can cause. The CLI turns each into one line on stderr and its exit code (2 unless noted).

Anything else that escapes is a bug in prunekit and ends with exit code 1.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class UnknownModelError(PrunekitError):
    """The model source names no model prunekit can build."""


class WeightsError(PrunekitError):
    """Weights are missing, corrupt, or do not fit the architecture."""


class DataError(PrunekitError):
    """A data folder is missing, empty or laid out wrongly."""


class CheckpointError(PrunekitError):
    """A checkpoint is missing, truncated, of another format, or inconsistent."""


class ConfigError(PrunekitError):
    """An option or config value is out of range or inconsistent."""


class AnalysisError(PrunekitError):
    """The model cannot be traced or analysed."""


class VerificationError(PrunekitError):
    """A numerical check failed: slimmed vs gated, or ONNX vs PyTorch."""


class TrainingError(PrunekitError):
    """Training cannot continue (for example a non-finite loss)."""


class ExportError(PrunekitError):
    """Export to ONNX failed or produced an invalid file."""


class AccuracyGateError(PrunekitError):
    """The slimmed model lost more accuracy than the user allowed (`--max-accuracy-drop`)."""

    exit_code = 3


class Interrupted(PrunekitError):
    """Ctrl-C during training; the fine-tune stage saves a resumable checkpoint first."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted")


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line error messages."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
