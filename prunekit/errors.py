"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2.

Anything else that escapes is a bug in prunekit and ends with exit code 1.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class UnknownModelError(PrunekitError):
    """The model name is not a torchvision classification model."""


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
