"""The one definition of "these outputs match": used by slim (slimmed vs gated) and export (ONNX vs PyTorch).

A candidate matches its reference when max |candidate - reference| <= rtol * max |reference|. The
tolerance is relative to the reference's peak so that it means the same for logits of any scale.
"""

from __future__ import annotations

from dataclasses import dataclass

# below this peak the reference is numerically zero; the tolerance does not shrink further
_PEAK_FLOOR = 1e-12


def tolerance(rtol: float, max_abs_ref: float) -> float:
    """The absolute tolerance that a max |diff| is held to."""
    return rtol * max(max_abs_ref, _PEAK_FLOOR)


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    max_abs_ref: float
    rtol: float

    @property
    def tolerance(self) -> float:
        return tolerance(self.rtol, self.max_abs_ref)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # NaN compares False: a NaN diff never passes

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_abs_ref": self.max_abs_ref,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
        }

    def describe(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.3g} > tolerance {self.tolerance:.3g} "
            f"(rtol {self.rtol:g} x max |reference| {self.max_abs_ref:.3g})"
        )


def compare_outputs(reference, candidate, rtol: float = 1e-4) -> Parity:  # noqa: ANN001 (torch tensors)
    """Parity of two tensors (any dtype; compared in float32)."""
    ref = reference.detach().float()
    diff = (ref - candidate.detach().float()).abs().max().item()
    return Parity(diff, ref.abs().max().item(), rtol)


__all__ = ["Parity", "compare_outputs", "tolerance"]
