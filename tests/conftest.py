"""Shared test helpers. Keep this file small: helpers that several test modules need, each well named."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.testing import randomize_

# the name the test modules import (`from conftest import randomize`)
randomize = randomize_

# the first line a long command prints before anything slow (`finetune: ...`, `run: ...`): progress, so it
# may come before an error line
PROGRESS_PREFIXES = ("finetune: ", "run: ", "... still ")


def message_lines(stderr: str) -> list[str]:
    """The non-empty lines of `stderr` without the progress lines that may precede an error."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIXES)]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite, and for the prunekit subprocesses it starts: the models
    here are tiny, and on a small shared CPU OpenMP threads waiting on each other cost 5-30x more than
    they gain. Restored afterwards."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def make_image_folder(root: Path, classes: int, train: int, val: int, size: int = 32) -> Path:
    """train/ and val/ trees of small PNGs; each class has its own mean colour, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 31 + 160) % 256])
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@contextlib.contextmanager
def interrupted_after(epochs: int) -> Iterator[None]:
    """Inside: Trainer.train_one_epoch raises KeyboardInterrupt (Ctrl-C) once `epochs` epochs are done."""
    from prunekit.trainer import Trainer

    real = Trainer.train_one_epoch

    def train_one_epoch(self: Trainer, *a: object, **k: object) -> dict:
        if self.epoch >= epochs:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", train_one_epoch)
        yield


def assert_resume_is_exact(
    gated: Path, data: Path, config: object, tmp_path: Path, interrupt_after: int
) -> None:
    """Fine-tune `gated` straight through, and again stopped by Ctrl-C after `interrupt_after` epochs and
    resumed: the same losses, and bit-identical weights (gates included) at the end."""
    from prunekit.checkpoint import load_checkpoint
    from prunekit.errors import Interrupted
    from prunekit.stages.finetune import finetune_stage

    finetune_stage(gated, str(data), tmp_path / "full.pt", config)  # type: ignore[arg-type]
    with interrupted_after(interrupt_after), pytest.raises(Interrupted):
        finetune_stage(gated, str(data), tmp_path / "resumed.pt", config)  # type: ignore[arg-type]
    finetune_stage(gated, str(data), tmp_path / "resumed.pt", config, resume=True)  # type: ignore[arg-type]
    full, resumed = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "resumed.pt")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches, the same samples


def no_result_on_stdout(stdout: str) -> bool:
    """A failed command printed no result: nothing, or (with --json) only its error document."""
    import json

    if not stdout:
        return True
    doc = json.loads(stdout)
    return set(doc) == {"schema_version", "prunekit_version", "torch_version", "command", "error"}
