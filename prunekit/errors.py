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


class WriteError(PrunekitError):
    """An output could not be written: a full disk, a read-only or special file system, a bad path.
    Whatever was at the path before is left as it was."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (how CI systems cancel a job), raised in the main thread by the CLI's handler. A subclass
    of KeyboardInterrupt, so every path that cleans up after Ctrl-C cleans up after it too."""


class Interrupted(PrunekitError):
    """Ctrl-C (exit code 130) or SIGTERM (exit code 143, 128 + the signal number, the shell convention)
    during a command. Fine-tuning leaves a resumable checkpoint first, and `message` says where."""

    def __init__(self, terminated: bool = False, message: str = "") -> None:
        self.terminated = terminated
        self.exit_code = 143 if terminated else 130
        cause = "terminated (SIGTERM)" if terminated else "interrupted"
        super().__init__(f"{cause}{'; ' + message if message else ''}")

    @classmethod
    def of(cls, exc: BaseException, message: str = "") -> Interrupted:
        """The Interrupted for a KeyboardInterrupt (a Terminated one for SIGTERM) or another Interrupted."""
        terminated = isinstance(exc, Terminated) or bool(getattr(exc, "terminated", False))
        return cls(terminated, message)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line error messages."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
