"""`evaluate`: top-1, top-5 and the mean loss, counted exactly, also over the shards of several processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.trainer import Evaluation, evaluate


class Fixed(nn.Module):
    """Returns the logits stored for each input index (the input is the index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def ranked(classes: int, labels: list[int], ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that put the label of example i at rank `ranks[i]` (0: the top prediction)."""
    logits = torch.zeros(len(labels), classes)
    for i, (label, rank) in enumerate(zip(labels, ranks, strict=True)):
        others = [c for c in range(classes) if c != label]
        order = others[:rank] + [label] + others[rank:]
        logits[i, order] = torch.arange(classes, 0, -1, dtype=torch.float32)
    return logits, torch.tensor(labels)


def batches(labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    index = torch.arange(len(labels))
    return [(index[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_top1_top5_and_loss() -> None:
    ranks = [0, 0, 1, 4, 5, 9, 2, 0]  # top-1: 3 of 8; top-5 (rank < 5): 6 of 8
    logits, labels = ranked(10, [3, 7, 1, 0, 9, 2, 5, 4], ranks)
    result = evaluate(Fixed(logits), batches(labels, 3), torch.device("cpu"))
    assert isinstance(result, Evaluation)
    assert result.top1 == 3 / 8 and result.top5 == 6 / 8
    expected_loss = float(nn.functional.cross_entropy(logits, labels))
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result == evaluate(Fixed(logits), batches(labels, 8), torch.device("cpu"))  # batching: same


def test_fewer_than_five_classes_top5_is_one() -> None:
    logits, labels = ranked(3, [0, 1, 2, 2], [2, 1, 0, 2])
    result = evaluate(Fixed(logits), batches(labels, 2), torch.device("cpu"))
    assert result.top1 == 1 / 4 and result.top5 == 1.0


def test_max_batches_and_an_empty_loader() -> None:
    logits, labels = ranked(10, [1, 2, 3, 4], [0, 6, 0, 6])
    first = evaluate(Fixed(logits), batches(labels, 2), torch.device("cpu"), max_batches=1)
    assert (first.top1, first.top5) == (0.5, 0.5)
    empty = evaluate(Fixed(logits), [], torch.device("cpu"))
    assert (empty.top1, empty.top5, empty.loss) == (0.0, 0.0, 0.0)


class OtherShard:
    """A Runtime stand-in: its `sum` adds the counts of another process's shard (as all_reduce would)."""

    def __init__(self, counts: list[float]) -> None:
        self.counts, self.calls = counts, 0

    def sum(self, values: list[float]) -> list[float]:
        self.calls += 1
        return [a + b for a, b in zip(values, self.counts, strict=True)]


def test_the_counts_of_every_process_are_summed() -> None:
    logits, labels = ranked(10, [0, 1, 2, 3], [0, 3, 7, 8])  # this shard: top-1 1, top-5 2 of 4
    loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    # the other shard: 6 examples, top-1 5, top-5 6, summed loss 1.5 (order: top-1, top-5, n, loss)
    runtime = OtherShard([5, 6, 6, 1.5])
    result = evaluate(Fixed(logits), batches(labels, 4), torch.device("cpu"), runtime=runtime)  # type: ignore[arg-type]
    assert runtime.calls == 1
    assert result.top1 == 6 / 10 and result.top5 == 8 / 10
    assert math.isclose(result.loss, (loss + 1.5) / 10, rel_tol=1e-6)
