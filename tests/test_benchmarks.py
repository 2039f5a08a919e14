"""Smoke runs of the benchmark scripts on a tiny budget (the real runs are benchmarks, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_peers_benchmark_smoke(tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    pytest.importorskip("matplotlib")
    out, plot, doc = tmp_path / "peers.json", tmp_path / "peers.png", tmp_path / "peers.md"
    args = ["--data", "builtin", "--weights", "none", "--targets", "0.5", "--epochs", "1", "--seeds", "0"]
    args += [
        "--distill",
        "0.7",
        "--max-steps-per-epoch",
        "1",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--eval-batches",
        "2",
    ]
    args += [
        "--methods",
        "prunekit,tp-l1-uniform,tp-taylor",
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--doc",
        str(doc),
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), *args],
        capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["runs"]] == ["prunekit", "tp-l1-uniform", "tp-taylor"]
    for r in result["runs"]:  # every method at (not above) the budget, counted by the same counter
        assert 0.3 * result["total_macs"] < r["macs"] <= 0.5 * result["total_macs"] * 1.01, r
        assert 0.0 <= r["top1"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prunekit | 0.5 | 1 | 0.7 | 1 |" in doc.read_text()
