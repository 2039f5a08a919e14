"""The slim model as a `torch.export` program (`.pt2`): what loads with plain PyTorch.

`torch.export.load(path).module()` gives a callable module in a process that has never imported
prunekit: the file holds the graph and the weights, no pickled classes. The batch axis is dynamic.
Before the file is put in place, it is loaded back and checked against the model it came from, on
random batches of two sizes and on the real inputs the slim stage verified.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ExportError, VerificationError, first_line
from prunekit.fileio import atomic_path
from prunekit.parity import compare_outputs

__all__ = ["Pt2Export", "export_pt2", "pt2_staging"]

_EXAMPLE_BATCH = 2  # traced with a batch of 2; 1 would let torch.export specialise the batch axis
_VERIFY_BATCHES = (3, 1)


@dataclass(frozen=True)
class Pt2Export:
    path: Path
    size_bytes: int
    max_abs_diff: float
    max_abs_ref: float
    rtol: float
    torch_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "torch.export",
            "size_bytes": self.size_bytes,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_ref": self.max_abs_ref,
            "rtol": self.rtol,
            "torch": self.torch_version,
            "load": "torch.export.load(path).module()",
        }


def pt2_staging(path: Path) -> contextlib.AbstractContextManager[Path]:
    """The temporary file a `.pt2` goes to before it replaces `path` (see fileio.atomic_path)."""
    return atomic_path(Path(path), suffix=".tmp.pt2", fsync=True)


def export_pt2(
    model: nn.Module,
    path: Path,
    *,
    input_shape: tuple[int, int, int],
    inputs: torch.Tensor | None = None,
    rtol: float = 1e-4,
    staged: bool = False,
) -> Pt2Export:
    """Export `model` (eval mode, CPU, float32) with `torch.export` and a dynamic batch axis, save it
    with `torch.export.save`, load it back and check its outputs. `staged`: `path` is a staging file
    the caller moves into place."""
    path = Path(path)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(_EXAMPLE_BATCH, *input_shape, generator=generator)
    checks = [torch.randn(b, *input_shape, generator=generator) for b in _VERIFY_BATCHES]
    if inputs is not None:
        checks.append(inputs.detach().cpu().float())
    model = model.eval()
    with contextlib.ExitStack() as stack:
        target = path if staged else stack.enter_context(pt2_staging(path))
        program = _export(model, example)
        torch.export.save(program, str(target))  # a failed write: atomic_path's WriteError
        loaded = torch.export.load(str(target)).module()
        worst = None
        with torch.no_grad():
            for x in checks:
                parity = compare_outputs(model(x), loaded(x), rtol)
                if not parity.ok:
                    raise VerificationError(
                        f"the torch.export program differs from the slim model on a batch of "
                        f"{x.shape[0]}: {parity.describe()}"
                    )
                if worst is None or parity.max_abs_diff > worst.max_abs_diff:
                    worst = parity
        size = os.path.getsize(target)
    assert worst is not None
    return Pt2Export(path, size, worst.max_abs_diff, worst.max_abs_ref, rtol, str(torch.__version__))


def _export(model: nn.Module, example: torch.Tensor) -> Any:
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types (UserError, guards, ...)
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}") from exc
