"""Smoke runs of the benchmark scripts on a tiny budget (the real runs are benchmarks, not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run benchmarks/<name> on one thread; its output is captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip


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
    proc = _script("peers.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["runs"]] == ["prunekit", "tp-l1-uniform", "tp-taylor"]
    for r in result["runs"]:  # every method at (not above) the budget, counted by the same counter
        assert 0.3 * result["total_macs"] < r["macs"] <= 0.5 * result["total_macs"] * 1.01, r
        assert 0.0 <= r["top1"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prunekit | 0.5 | 1 | 0.7 | 1 |" in doc.read_text()


def test_allocations_benchmark_smoke(tmp_path: Path) -> None:
    """Two shapes at the same target: each fits the budget, and the layer4 cut moves width into the early
    stages (the shape is applied, not ignored)."""
    out = tmp_path / "alloc.json"
    args = ["--data", "builtin", "--weights", "none", "--target", "0.5", "--epochs", "1", "--seeds", "0"]
    args += ["--max-steps-per-epoch", "1", "--batch-size", "16", "--workers", "0", "--eval-batches", "2"]
    args += ["--recalibrate-batches", "1", "--shape", "uniform=layer1:1", "--shape", "l4=layer4:0.3"]
    proc = _script("allocations.py", [*args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    uniform, cut = json.loads(out.read_text())["runs"]
    for r in (uniform, cut):
        assert 0.4 < r["macs"] <= 0.5, r
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top1_before_finetune"] <= 1.0
    assert cut["widths"]["layer4.1.conv1"] < uniform["widths"]["layer4.1.conv1"]
    assert cut["widths"]["layer2.1.conv1"] > uniform["widths"]["layer2.1.conv1"]


def test_throughput_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--data", "builtin", "--weights", "none", "--rounds", "1", "--block", "2", "--batch-size", "16"]
    args += ["--workers", "0", "--distill", "0,0.7", "--out", str(out)]
    proc = _script("throughput.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["distill"] for r in result["results"]] == [0.0, 0.7]
    for r in result["results"]:
        rates = r["images_per_s_mean"]
        assert set(rates) == {"prunekit", "masked", "plain"} and all(v > 0 for v in rates.values())
        assert r["prunekit_over_plain"] == rates["prunekit"] / rates["plain"]
    assert "prunekit/plain" in proc.stdout


def test_dynamic_benchmark_smoke(tmp_path: Path) -> None:
    out, plot = tmp_path / "dynamic.json", tmp_path / "dynamic.png"
    args = ["--data", "builtin", "--weights", "none", "--epochs", "1", "--max-steps-per-epoch", "2"]
    args += ["--batch-size", "16", "--workers", "0", "--latency-examples", "3", "--rounds", "1"]
    args += ["--latency-sizes", "32,48", "--out", str(out), "--plot", str(plot)]
    proc = _script("dynamic.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert set(run["latency"]) == {"32", "48"}
    for cell in run["latency"].values():
        assert set(cell["ms"]) == {"dense", "static", "dynamic"} and all(v > 0 for v in cell["ms"].values())
        assert len(cell["scatter"]["macs_fraction"]) == len(cell["scatter"]["ms"]) == 3
        assert cell["speedup_over_reduction"] == cell["dynamic_speedup"] / cell["dynamic_mac_reduction"]
    assert run["dynamic_check"]["max_abs_diff"] <= 1e-4 * max(1.0, run["dynamic_check"]["output_scale"])
    assert plot.is_file() and "dynamic speedup" in proc.stdout
    d = run["decisions"]  # the study of how input-dependent the decisions are
    assert abs(d["always_on"] + d["always_off"] + d["input_dependent"] - 1.0) < 1e-6
    assert d["majority_static_macs"] <= d["dynamic_mean_macs"] + 1e-6
    assert 0.0 <= d["majority_static_top1"] <= 1.0 and "majority static model" in proc.stdout


def test_dynamic_diagnostic_smoke(tmp_path: Path) -> None:
    out = tmp_path / "diagnostic.json"
    args = ["--data", "builtin", "--weights", "none", "--epochs", "1", "--max-steps-per-epoch", "2"]
    args += ["--batch-size", "16", "--workers", "0", "--out", str(out)]
    proc = _script("dynamic_diagnostic.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= 1 and result["macs"] <= 0.5 + 0.01


def _result(command: str, runs: list[dict]) -> dict:
    return {
        "command": command,
        "baseline_top1": 0.8,
        "total_macs": 1000,
        "torch": "x",
        "summary": [],
        "runs": runs,
    }


def _run(method: str, top1: float, seed: int, variant: str = "") -> dict:
    cell = {"method": method, "target": 0.5, "epochs": 2, "seed": seed, "distill": 0.7, "top1": top1}
    return cell | {"macs": 490, "params": 1, "seconds": 1.0, "variant": variant, "widths": {}}


def test_peers_merge_combines_pieces_of_a_grid_and_keeps_variants_apart(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_result("A", [_run("prunekit", 0.80, 0), _run("tp-l1-uniform", 0.79, 0)])))
    b.write_text(json.dumps(_result("B", [_run("prunekit", 0.82, 1), _run("prunekit", 0.7, 1, "method=x")])))
    out, doc = tmp_path / "m.json", tmp_path / "m.md"
    args = [
        "--merge",
        str(a),
        str(b),
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "m.png"),
        "--doc",
        str(doc),
    ]
    proc = _script("peers.py", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads(out.read_text())
    rows = {r["method"]: r for r in merged["summary"]}
    assert set(rows) == {"prunekit", "prunekit [method=x]", "tp-l1-uniform"}
    assert rows["prunekit"]["seeds"] == 2 and abs(rows["prunekit"]["top1_mean"] - 0.81) < 1e-9
    assert abs(rows["prunekit"]["top1_spread"] - 0.02) < 1e-9
    assert merged["commands"] == ["A", "B"] and len(merged["runs"]) == 4
    text = doc.read_text()
    assert "| prunekit | 0.5 | 2 | 0.7 | 2 | 0.490 | 81.00% | 2.00 | 1 |" in text
    assert "- `A`" in text and "- `B`" in text
    # each prunekit recipe against the best peer in its cell: 81.00 (2 seeds) against 79.00 (1 seed)
    assert (
        "| 0.5 | 2 | 0.7 | prunekit | 81.00% (2) | 0.490 | tp-l1-uniform | 79.00% (1) | 0.490 | +2.00 |"
        in text
    )
    assert "| prunekit [method=x] | 70.00% (1) | 0.490 | tp-l1-uniform | 79.00% (1) | 0.490 | -9.00 |" in text
    other = _result("C", [_run("prunekit", 0.5, 0)]) | {"total_macs": 7}
    b.write_text(json.dumps(other))
    proc = _script("peers.py", args)
    assert proc.returncode != 0 and "not of the same fixture" in proc.stderr


def test_peers_merge_lets_a_rerun_supersede_the_run_it_repeats(tmp_path: Path) -> None:
    """A later file's run of the same method, variant, cell and seed replaces the earlier one (kept aside),
    so a grid can be repaired by rerunning a piece; a merged file merges again with the same result."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_result("A ; B", [_run("tp-taylor", 0.70, 1), _run("tp-taylor", 0.74, 0)])))
    new.write_text(json.dumps(_result("C", [_run("tp-taylor", 0.76, 1), _run("tp-taylor", 0.5, 1, "v")])))
    out = tmp_path / "m.json"
    args = ["--out", str(out), "--plot", str(tmp_path / "m.png"), "--doc", str(tmp_path / "m.md")]
    proc = _script("peers.py", ["--merge", str(old), str(new), *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads(out.read_text())
    assert sorted(r["top1"] for r in merged["runs"]) == [0.5, 0.74, 0.76]
    assert [r["top1"] for r in merged["superseded"]] == [0.70]
    row = next(r for r in merged["summary"] if r["method"] == "tp-taylor")
    assert row["seeds"] == 2 and abs(row["top1_mean"] - 0.75) < 1e-9
    assert merged["commands"] == ["A", "B", "C"]
    again = tmp_path / "again.json"
    proc = _script("peers.py", ["--merge", str(out), "--out", str(again), *args[2:]])
    assert proc.returncode == 0, proc.stderr[-2000:]
    remerged = json.loads(again.read_text())
    assert remerged["runs"] == merged["runs"] and remerged["superseded"] == merged["superseded"]
