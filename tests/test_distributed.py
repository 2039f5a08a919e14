"""Fine-tuning on two CPU processes with torchrun (gloo): rank 0 alone writes and prints, decisions are
the same on every rank, sharded evaluation equals a single process's, a dead peer ends the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prunekit.checkpoint import load_checkpoint
from prunekit.config import SlimConfig
from prunekit.data import resolve_data
from prunekit.stages.slim import slim_stage
from prunekit.trainer import evaluate

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")

FINETUNE = ["--data", "builtin", "--target-macs", "0.5", "--batch-size", "16", "--workers", "0"]


def torchrun(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prunekit.config import ModelSpec
    from prunekit.stages.gate import gate_stage

    path = tmp_path_factory.mktemp("ddp") / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=10, input_shape=(3, 32, 32)), path)
    return path


WORKER = textwrap.dedent(
    """
    # One torchrun worker: fine-tune with prunekit and record, per rank, every checkpoint write and the
    # gate decisions it reached.
    import os, sys
    from pathlib import Path
    import prunekit.stages.finetune as stage
    from prunekit.config import FinetuneConfig
    from prunekit.runtime import decisions_hash

    rank, log = os.environ["RANK"], Path(sys.argv[3])
    real_save = stage.save_checkpoint

    def recording_save(ckpt, path):
        with open(log / f"writes-rank{rank}.txt", "a") as f:
            f.write(f"{path}\\n")
        real_save(ckpt, path)

    stage.save_checkpoint = recording_save
    real_loaders = stage.data_loaders

    def recording_loaders(*args, **kwargs):
        loaders = real_loaders(*args, **kwargs)
        train, val = loaders.train.sampler, loaders.val.sampler
        (log / f"samplers-rank{rank}.txt").write_text(
            f"{type(train).__name__} {len(train)} {type(val).__name__} {list(val)[:2]} {len(val)}"
        )
        return loaders

    stage.data_loaders = recording_loaders
    config = FinetuneConfig(target_macs=0.5, epochs=2, batch_size=16, workers=0, max_steps_per_epoch=4)
    result = stage.finetune_stage(Path(sys.argv[1]), "builtin", Path(sys.argv[2]), config)
    (log / f"decisions-rank{rank}.txt").write_text(decisions_hash(result.checkpoint.gates.decisions()))
    """
)


def test_two_processes_write_once_decide_alike_and_evaluate_exactly(gated: Path, tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "log"
    log.mkdir()
    out = tmp_path / "tuned.pt"
    proc = torchrun(tmp_path / "worker.py", gated, out, log, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone wrote checkpoints: every epoch's last, and the best within the budget
    assert sorted(p.name for p in log.glob("writes-*")) == ["writes-rank0.txt"]
    writes = (log / "writes-rank0.txt").read_text().split()
    assert writes.count(str(out)) == 2 and sorted({Path(w).name for w in writes}) == [
        "tuned.best.pt",
        "tuned.pt",
    ]
    # each rank trains on its half of every epoch and evaluates its own shard of the validation set
    samplers = {p.name: p.read_text().split(" ", 3) for p in log.glob("samplers-*")}
    assert samplers["samplers-rank0.txt"][:3] == ["DistributedSampler", "3000", "ShardSampler"]
    assert samplers["samplers-rank1.txt"][:3] == ["DistributedSampler", "3000", "ShardSampler"]
    assert (
        samplers["samplers-rank0.txt"][3] == "[0, 2] 500"
        and samplers["samplers-rank1.txt"][3] == "[1, 3] 500"
    )
    # the same gate decisions on both ranks
    hashes = {p.name: p.read_text() for p in log.glob("decisions-*")}
    assert len(hashes) == 2 and len(set(hashes.values())) == 1
    # the checkpoint loads, holds those decisions, and slims exactly (slim_stage verifies parity)
    ckpt = load_checkpoint(out)
    from prunekit.runtime import decisions_hash

    assert decisions_hash(ckpt.gates.decisions()) == hashes["decisions-rank0.txt"]
    slim = slim_stage(out, tmp_path / "slim.pt", SlimConfig(export="none"))
    assert slim.parity.ok and slim.slim_size.macs < slim.original.macs
    # the validation accuracy of the sharded, all-reduced evaluation equals one process's
    spec = ckpt.spec
    val = resolve_data(
        "builtin", input_shape=spec.input_shape, mean=spec.mean, std=spec.std, batch_size=64
    ).val
    val_eval = evaluate(ckpt.model, val, torch.device("cpu"))
    assert ckpt.history[-1]["val_acc"] == val_eval.top1
    assert ckpt.history[-1]["val_top5"] == val_eval.top5
    assert ckpt.history[-1]["val_loss"] == pytest.approx(val_eval.loss, rel=1e-6)


def test_torchrun_cli_prints_once(gated: Path, tmp_path: Path) -> None:
    proc = torchrun(
        "-m", "prunekit", "finetune", gated, "-o", "tuned.pt", *FINETUNE, "--epochs", "1",
        "--max-steps-per-epoch", "3", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert doc["final"]["decided"] and doc["output"] == "tuned.pt"
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"event"')]
    assert [e["event"] for e in events] == ["begin", "baseline", "start", "epoch"]  # from rank 0 only
    assert "Traceback" not in proc.stderr


def _worker_pids(parent: int) -> dict[str, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = next((v[11:].decode() for v in environ if v.startswith(b"LOCAL_RANK=")), None)
        if ppid == parent and rank is not None:
            found[rank] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the workers")
def test_a_killed_rank_ends_the_run_and_the_last_checkpoint_resumes(gated: Path, tmp_path: Path) -> None:
    args = [
        "-m",
        "prunekit",
        "finetune",
        gated,
        "-o",
        "tuned.pt",
        *FINETUNE,
        "--epochs",
        "3",
        "--max-steps-per-epoch",
        "25",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *map(str, args)]
    run = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "tuned.pt").exists():  # the first epoch's checkpoint
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch"
            time.sleep(0.1)
        workers = _worker_pids(run.pid)
        assert set(workers) == {"0", "1"}
        os.kill(workers["1"], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert ended < 60, f"the other rank took {ended:.0f} s to stop"
    assert "rank      : 1" in stderr or "a collective operation failed" in stderr  # who failed is said
    assert not _worker_pids(run.pid)  # no process left behind
    saved = load_checkpoint(tmp_path / "tuned.pt")
    assert saved.training is not None and int(saved.training["epoch"]) >= 1  # resumable
    resumed = torchrun(*args, "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = json.loads(resumed.stdout)
    assert [h["epoch"] for h in doc["history"]] == [1, 2, 3]


def test_shard_sampler_covers_every_example_once() -> None:
    from prunekit.runtime import ShardSampler

    data = list(range(103))
    shards = [list(ShardSampler(data, rank, 4)) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(ShardSampler(data, rank, 4)) for rank in range(4)] == [len(s) for s in shards]


def test_resume_needs_the_same_number_of_processes(gated: Path) -> None:
    from prunekit.config import FinetuneConfig
    from prunekit.errors import ConfigError
    from prunekit.stages.finetune import prepare_finetune

    config = FinetuneConfig(target_macs=0.5, distill=0.0)
    trainer = prepare_finetune(load_checkpoint(gated), config, 4).trainer
    state = trainer.state()
    assert len(state["rng_per_rank"]) == 1
    trainer.load_state(state)  # one process, as saved
    two_processes = state | {"rng_per_rank": state["rng_per_rank"] * 2}  # as a 2-process run saves it
    with pytest.raises(ConfigError, match="used 2 process.*same number"):
        trainer.load_state(two_processes)
