"""Switching a model's training flags for a while, restoring each module's own flag afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def training_flags(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's own training flag on exit (not one flag for the whole tree, which is
    what `model.train(was)` would do: it would switch a decided gate bank or a frozen BN back on)."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


__all__ = ["training_flags"]
