"""Hostile input and faults, by category (docs/robustness.md): images that do not decode, failed
writes, signals, exact resume, degenerate batches, out-of-range and mistyped values, non-finite
checkpoints, run directories, and one error format for everything.

Every case asserts the exit code, exactly one `error:` line and no traceback, and that no file changed
besides the declared output (a pre-existing output stays intact)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from typer.testing import CliRunner

from prunekit.checkpoint import load_checkpoint, read_checkpoint_data, save_checkpoint
from prunekit.cli import app
from prunekit.config import FinetuneConfig, ModelSpec
from prunekit.data import TolerantImageFolder, resolve_data, screen_images
from prunekit.errors import ConfigError, DataError
from prunekit.fileio import atomic_path, remove_stale_temporaries
from prunekit.stages import finetune as finetune_module
from prunekit.stages.finetune import FinetuneCallbacks, finetune_stage
from prunekit.stages.gate import gate_stage

EXE = Path(sys.executable).parent / "prunekit"
FT = ["--target-macs", "0.5", "--batch-size", "8", "--max-steps-per-epoch", "1"]
FT += ["--workers", "0", "--device", "cpu"]


# -- helpers -----------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file (and link) under `roots`: what a failed command must not change."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error(code: int, exit_code: int, stdout: str, stderr: str, *fragments: str) -> str:
    assert exit_code == code, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def failed(result: Any, *fragments: str, code: int = 2) -> str:
    return one_error(code, result.exit_code, result.stdout, result.stderr, *fragments)


def run_exe(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run(
        [str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300, env=env, **kwargs
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(gated resnet18, 3 classes at 32 px; an ImageFolder of 3 classes with 8 train / 2 val each)."""
    root = tmp_path_factory.mktemp("robust")
    data = make_image_folder(root / "data", classes=3, train=8, val=2)
    gated = root / "gated.pt"
    gate_stage(ModelSpec("resnet18", num_classes=3, input_shape=32), gated)
    return gated, data


def _jpeg_bytes(size: int = 48) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95
    )
    return buf.getvalue()


BAD_FILES = {
    "zero-byte": lambda p: p.with_suffix(".jpg").write_bytes(b""),
    "not-an-image": lambda p: p.with_suffix(".png").write_text("hello, I am text"),
    "truncated-jpeg": lambda p: p.with_suffix(".jpg").write_bytes(_jpeg_bytes()[:400]),
    "truncated-png": lambda p: p.with_suffix(".png").write_bytes((p.parent / "0.png").read_bytes()[:200]),
    "broken-symlink": lambda p: p.with_suffix(".png").symlink_to(p.parent / "does-not-exist.png"),
}


def _bad_copy(data: Path, tmp: Path, kind: str, split: str) -> tuple[Path, Path]:
    root = tmp / "bad"
    shutil.copytree(data, root, symlinks=True)
    target = root / split / "class1" / f"bad-{kind}"
    BAD_FILES[kind](target)
    return root, next((root / split / "class1").glob(f"bad-{kind}.*"))


# -- 1. images that do not decode --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_screening_finds_every_kind_of_bad_image(tiny: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    _, data = tiny
    root, bad = _bad_copy(data, tmp_path, kind, "train")
    paths = [str(p) for p in sorted((root / "train").rglob("*.*"))]
    found = dict(screen_images(paths, full_decode=True))
    assert list(found) == [str(bad)], found
    if not kind.startswith("truncated"):  # a truncated file's header is whole: the full decode sees it
        assert list(dict(screen_images(paths))) == [str(bad)]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", ["zero-byte", "not-an-image", "truncated-jpeg", "broken-symlink"])
def test_strict_data_refuses_bad_images_before_training(
    tiny: tuple[Path, Path], tmp_path: Path, kind: str, split: str
) -> None:
    gated, data = tiny
    root, bad = _bad_copy(data, tmp_path, kind, split)
    out = tmp_path / "tuned.pt"
    before = snapshot(tmp_path)
    message = failed(cli("finetune", gated, "--data", root, *FT, "--strict-data", "-o", out), str(bad))
    assert "do not decode" in message
    assert snapshot(tmp_path) == before  # no output, nothing changed


def test_bad_images_are_skipped_with_a_warning_by_default(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    root = tmp_path / "bad"
    shutil.copytree(data, root)
    bad = []
    for i, (kind, make) in enumerate(sorted(BAD_FILES.items())):
        split = "train" if i % 2 == 0 else "val"
        make(root / split / "class2" / f"bad-{kind}")
        bad += list((root / split / "class2").glob(f"bad-{kind}.*"))
    out = tmp_path / "tuned.pt"
    result = cli("finetune", gated, "--data", root, *FT, "--epochs", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert warnings and "Traceback" not in result.stderr
    for path in bad:
        assert str(path) in " ".join(warnings), (path, warnings)
    assert load_checkpoint(out).stage == "finetuned"


def test_a_stand_in_comes_from_the_same_split(tmp_path: Path) -> None:
    from prunekit.data import SplitSubset

    root = make_image_folder(tmp_path / "d", classes=1, train=4, val=1, size=80)
    folder = TolerantImageFolder(root / "train", allow_empty=True)
    train, val = SplitSubset(folder, [0, 2]), SplitSubset(folder, [1, 3])
    Path(folder.samples[2][0]).write_bytes(b"broken after screening")
    expected = folder[0][0]
    assert train[1][0].tobytes() == expected.tobytes()  # 2 is broken: 0, of train, stands in
    assert val[0][0].tobytes() == folder[1][0].tobytes()


def test_the_watchdog_speaks_when_nothing_else_does(capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli.progress import Progress

    progress = Progress(json_lines=False)
    progress.heartbeat_s = 0.2
    progress.begin("finetune", "g.pt on data")
    time.sleep(0.7)  # a long evaluation, a slow data screening: no step, no epoch line
    progress.stop()
    err = capsys.readouterr().err
    assert "... still loading the model and the data" in err, err


def test_an_image_that_breaks_after_screening_is_replaced_not_fatal(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, train=3, val=1, size=80)
    folder = TolerantImageFolder(root / "train", allow_empty=True)
    victim = Path(folder.samples[0][0])
    victim.write_bytes(victim.read_bytes()[:100])  # truncated once screening has passed it
    image, label = folder[0]
    assert label == folder.samples[1][1] and image.size == (80, 80)  # the next image stood in
    folder.strict = True
    with pytest.raises(DataError, match="does not decode"):
        folder[0]


# -- 2. full disks and unwritable targets ------------------------------------------------------------------


def _limit_file_size(limit: int) -> Any:
    def preexec() -> None:  # a real failed write (EFBIG) in the file system, like a full disk's ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize(
    "args",
    [
        ["gate", "resnet18", "--num-classes", "3", "--input-shape", "32"],
        ["slim", "{gated}", "--export", "onnx"],
        ["slim", "{gated}", "--export", "none"],
    ],
    ids=["gate-checkpoint", "slim-onnx", "slim-checkpoint"],
)
def test_a_write_that_fails_in_the_file_system_keeps_the_old_file(
    tiny: tuple[Path, Path], tmp_path: Path, args: list[str]
) -> None:
    gated, _ = tiny
    out = tmp_path / ("model.onnx" if "onnx" in args else "out.pt")
    out.write_text("the previous output")
    before = snapshot(tmp_path)
    argv = [a.replace("{gated}", str(gated)) for a in args]
    proc = run_exe(*argv, "-o", out, preexec_fn=_limit_file_size(200_000))
    one_error(2, proc.returncode, proc.stdout, proc.stderr, f"cannot write {out}")
    assert snapshot(tmp_path) == before  # the old file intact, no temporary left


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    """ENOSPC on a real 1 MiB tmpfs, where the machine lets an unprivileged user namespace mount one."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt} && echo previous > {mnt}/g.pt && "
        f"{EXE} gate resnet18 --num-classes 3 --input-shape 32 -o {mnt}/g.pt; echo rc=$?; "
        f"ls -A {mnt}; cat {mnt}/g.pt"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    one_error(2, 2, "", proc.stderr, "No space left on device")
    assert proc.stdout.split("rc=2", 1)[1].split() == ["g.pt", "previous"]  # only the old file, intact


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("/proc/prunekit-test.pt", "cannot write /proc/prunekit-test.pt"),
        ("/sys/prunekit-test.pt", "cannot write /sys/prunekit-test.pt"),
        ("/proc/self/prunekit-test.pt", "cannot write"),
        ("/dev/full", "not a regular file"),
        ("/dev/null", "not a regular file"),
        ("{tmp}/missing/dir/g.pt", "does not exist"),
        ("{tmp}/afile/g.pt", "is not a directory"),
    ],
)
def test_unwritable_targets_are_refused_before_work(tmp_path: Path, target: str, fragment: str) -> None:
    (tmp_path / "afile").write_text("x")
    target = target.replace("{tmp}", str(tmp_path))
    before = snapshot(tmp_path)
    dev = {p: os.stat(p) for p in ("/dev/full", "/dev/null")}
    failed(cli("gate", "resnet18", "--num-classes", "3", "--input-shape", "32", "-o", target), fragment)
    assert snapshot(tmp_path) == before
    for p, st in dev.items():  # never replaced by a file, even for root
        assert os.stat(p).st_rdev == st.st_rdev and not Path(p).is_file()


def test_a_failed_epoch_checkpoint_keeps_the_last_good_one_and_says_where(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    real_save = finetune_module.save_checkpoint
    calls = {"n": 0}

    def full_disk_on_the_second_epoch(ckpt: Any, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] >= 2 and Path(path) == out:
            with atomic_path(Path(path)) as tmp:
                tmp.write_bytes(b"partial")
                raise OSError(28, "No space left on device")
        real_save(ckpt, path)

    monkeypatch.setattr(finetune_module, "save_checkpoint", full_disk_on_the_second_epoch)
    result = cli("finetune", gated, "--data", data, *FT, "--epochs", "3", "-o", out)
    failed(result, "No space left on device", f"the last good checkpoint is {out} (after epoch 1)")
    saved = read_checkpoint_data(out)
    assert saved["training"]["epoch"] == 1 and [h["epoch"] for h in saved["history"]] == [1]
    assert {p.name for p in tmp_path.iterdir()} <= {"tuned.pt", "tuned.best.pt", "tuned.metrics.csv"}


def test_temporaries_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "tuned.pt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".tuned.pt.{dead.stdout.strip()}.abcd.tmp"
    live = tmp_path / f".tuned.pt.{os.getpid()}.efgh.tmp"  # a write in progress (this process) stays
    other = tmp_path / ".other.pt.1.x.tmp"
    for p in (stale, live, other):
        p.write_text("half")
    assert remove_stale_temporaries(target) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


SIGKILL_WRITER = """
import sys, torch
from prunekit.fileio import atomic_path
path, ready = sys.argv[1], sys.argv[2]
big = {"w": torch.randn(4_000_000)}
i = 0
while True:
    big["i"] = torch.tensor(i)
    with atomic_path(__import__("pathlib").Path(path)) as tmp:
        torch.save(big, tmp)
    i += 1
    if i == 1:
        open(ready, "w").close()
"""


def test_sigkill_during_a_write_leaves_the_previous_file_loadable(tmp_path: Path) -> None:
    target, ready = tmp_path / "ckpt.pt", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SIGKILL_WRITER, str(target), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        time.sleep(0.3)  # somewhere in the middle of a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = torch.load(target, weights_only=True)  # the last complete file, whole
    assert data["w"].shape == (4_000_000,)
    with atomic_path(target) as tmp:  # the next write to that path removes what the killed one left
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ready"]


# -- 3. signals from CI ------------------------------------------------------------------------------------


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [str(EXE), "finetune", str(gated), "--data", str(data), *FT, "--epochs", "200", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert out.exists(), proc.stderr.read() if proc.poll() is not None else "no epoch in 120 s"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    message = one_error(143, proc.returncode, stdout, stderr, "terminated (SIGTERM)", f"resume from {out}")
    assert "--resume" in message
    saved = read_checkpoint_data(out)
    assert saved["training"] is not None and saved["training"]["epoch"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned.metrics.csv", "tuned.pt"]  # no temporary


def test_sigterm_to_the_process_group_with_data_workers(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """What `timeout` and CI runners do: SIGTERM to every process of the job, the DataLoader workers too."""
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [
        str(EXE),
        "finetune",
        str(gated),
        "--data",
        str(data),
        "--target-macs",
        "0.5",
        "--batch-size",
        "2",
    ]
    args += ["--workers", "2", "--device", "cpu", "--epochs", "200", "-o", str(out)]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert out.exists(), "no epoch in 120 s"
        time.sleep(0.5)  # inside a later epoch, workers running
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    one_error(143, proc.returncode, stdout, stderr, "terminated (SIGTERM)", f"resume from {out}")
    assert read_checkpoint_data(out)["training"] is not None


def test_sigterm_in_any_command_is_one_line_143(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from prunekit.cli import common\n"
        "@common.user_errors\n"
        "def slow():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    import time; time.sleep(30)\n"
        "import typer\n"
        "try:\n"
        "    slow()\n"
        "except typer.Exit as e:\n"
        "    sys.exit(e.exit_code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    one_error(143, proc.returncode, proc.stdout, proc.stderr, "terminated (SIGTERM)")


# -- 4. resume that is exact -------------------------------------------------------------------------------


def _run(  # noqa: ANN202
    gated: Path,
    data: Path,
    out: Path,
    stop_at: tuple[int, int] | None = None,
    resume: bool = False,
    workers: int = 0,
):
    """finetune_stage over 3 epochs of 3 steps; `stop_at` (epoch, step): Ctrl-C right after that step."""
    config = FinetuneConfig(
        target_macs=0.5,
        epochs=3,
        batch_size=8,
        workers=workers,
        device="cpu",
        max_steps_per_epoch=3,
        decide_at=0.5,
    )
    seen = {"epoch": 1}

    def on_step(row: dict[str, float]) -> None:
        if stop_at is not None and (seen["epoch"], int(row["step"])) == stop_at:
            raise KeyboardInterrupt

    def on_epoch(m: Any) -> None:
        seen["epoch"] = m.epoch + 1

    callbacks = FinetuneCallbacks(on_step=on_step, on_epoch=on_epoch)
    if resume:
        return finetune_stage(gated, str(data), out, resume=True, overrides={}, callbacks=callbacks)
    return finetune_stage(gated, str(data), out, config, callbacks=callbacks)


@pytest.mark.parametrize(
    "stop_at, workers",
    [((1, 2), 0), ((2, 2), 0), ((2, 2), 2)],
    ids=["first-epoch", "middle-epoch", "workers"],
)
def test_an_interrupt_mid_epoch_then_resume_equals_the_uninterrupted_run(
    tiny: tuple[Path, Path], tmp_path: Path, stop_at: tuple[int, int], workers: int
) -> None:
    gated, data = tiny
    whole = _run(gated, data, tmp_path / "whole.pt", workers=workers)
    out = tmp_path / "parts.pt"
    with pytest.raises(Exception) as info:
        _run(gated, data, out, stop_at=stop_at, workers=workers)
    assert type(info.value).__name__ == "Interrupted" and f"after epoch {stop_at[0] - 1}" in str(info.value)
    resumed = _run(gated, data, out, resume=True)
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["epoch"] == b["epoch"] and a["loss"] == b["loss"] and a["val_acc"] == b["val_acc"], (a, b)
    w1, w2 = whole.model.state_dict(), resumed.model.state_dict()
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


# -- 5. degenerate batches and data ------------------------------------------------------------------------


@pytest.mark.parametrize("train, batch", [(3, 2), (9, 4), (2, 64), (4, 3)])
def test_last_batches_of_one_and_batches_larger_than_the_data_train(
    tiny: tuple[Path, Path], tmp_path: Path, train: int, batch: int
) -> None:
    gated, _ = tiny  # 3 classes: `train` images each
    data = make_image_folder(tmp_path / "d", classes=3, train=train, val=1)
    loaders = resolve_data(str(data), input_shape=(3, 32, 32), batch_size=batch)
    assert all(x.shape[0] > 1 for x, _ in loaders.train)  # never a batch of one in training
    out = tmp_path / "t.pt"
    result = cli(
        "finetune", gated, "--data", data, *FT[:2], "--batch-size", batch, "--workers", "0", "-o", out
    )
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--std", "0,0,0", "std must be finite and positive"),
        ("--std", "1,0,1", "std must be finite and positive"),
        ("--std", "-1,1,1", "std must be finite and positive"),
        ("--std", "inf,1,1", "std must be finite"),
        ("--mean", "nan,0,0", "mean must be finite"),
        ("--mean", "0.5,0.5", "mean needs 3 values"),
        ("--mean", "a,b,c", "--mean takes comma-separated numbers"),
    ],
)
def test_meaningless_normalisation_is_refused_at_gate(
    tmp_path: Path, option: str, value: str, fragment: str
) -> None:
    out = tmp_path / "g.pt"
    failed(
        cli("gate", "resnet18", "--num-classes", "3", "--input-shape", "32", f"{option}={value}", "-o", out),
        fragment,
    )
    assert not out.exists()


# -- 6./7. numbers out of range, typed config errors -------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seed", "-1"], "seed must be in 0 .. 4294967295"),
        (["--seed", str(2**64)], "seed"),
        (["--seed", str(2**32)], "seed must be in 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--gate-lr", "-0.1"], "learning rates must be positive"),
        (["--lambda", "inf"], "lam must be a finite number"),
        (["--tau", "0"], "tau must be positive"),
        (["--decide-at", "1.5"], "decide_at must be in (0, 1]"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--workers", "-1"], "--workers"),
        (["--distill", "2"], "--distill"),
        (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
        (["--epochs", "1.5"], "--epochs"),
        (["--target-macs", "1.5"], "target_macs must be between 0 and 1"),
        (["--target-macs", "nan"], "target_macs must be a finite number"),
    ],
)
def test_out_of_range_finetune_values_are_refused_before_work(
    tiny: tuple[Path, Path], tmp_path: Path, args: list[str], fragment: str
) -> None:
    gated, data = tiny
    out = tmp_path / "t.pt"
    base = ["--target-macs", "0.5", "--workers", "0"]
    failed(cli("finetune", gated, "--data", data, *base, *args, "-o", out), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "section, line, fragment",
    [
        ("finetune", "seed = -1", "seed must be in 0"),
        ("finetune", "seed = 18446744073709551615", "seed is out of range"),
        ("finetune", "epochs = 1.7", "epochs must be an int, got 1.7"),
        ("finetune", 'lr = "fast"', "lr must be a float, got 'fast'"),
        ("finetune", "lr = nan", "lr must be a finite number"),
        ("finetune", 'amp = "yes"', "amp must be a bool"),
        ("gates", "granularity = 8.5", "granularity must be an int, got 8.5"),
        ("gates", "granularity = 0", "granularity must be >= 1"),
        ("gates", "min_keep = inf", "min_keep must be a finite number"),
        ("slim", 'latency = "no"', "latency must be a bool, got 'no'"),
        ("slim", "threads = 0", "threads must be >= 1"),
        ("slim", 'export = "tflite"', "export must be onnx, pt2"),
        ("model", "num_classes = 0", "num_classes must be an integer from 1"),
        ("model", "num_classes = 1e9", "num_classes"),
        ("model", "std = [0, 0, 0]", "std must be finite and positive"),
        ("model", 'input_shape = "huge"', "input shape must be C,H,W"),
    ],
)
def test_config_values_are_checked_with_their_key_before_any_stage(
    tmp_path: Path, section: str, line: str, fragment: str
) -> None:
    sections = {
        "model": ['arch = "resnet18"', "num_classes = 10", "input_shape = 32"],
        "gates": [],
        "finetune": ['data = "builtin"', "target_macs = 0.5", "max_steps_per_epoch = 1", "workers = 0"],
        "slim": [],
    }
    key = line.split("=")[0].strip()
    sections[section] = [entry for entry in sections[section] if not entry.startswith(key)] + [line]
    config = tmp_path / "run.toml"
    config.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    failed(cli("run", config, "-o", run_dir), fragment)
    assert time.monotonic() - started < 10  # refused before any training
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_config_classes_check_ranges_in_the_api_too() -> None:
    for bad in (
        {"seed": -1},
        {"seed": 2**64},
        {"lr": float("nan")},
        {"epochs": True},
        {"tau_end": float("inf")},
    ):
        with pytest.raises(ConfigError):
            FinetuneConfig(target_macs=0.5, **bad)


# -- 8. a checkpoint that is finite but broken -------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_checkpoint(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    gated, _ = tiny
    ckpt = load_checkpoint(gated)
    with torch.no_grad():
        ckpt.model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "diverged.pt"
    save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["slim", "{ckpt}", "-o", "{tmp}/m.onnx"],
        ["report", "{ckpt}"],
        ["finetune", "{ckpt}", *FT, "--data", "builtin", "-o", "{tmp}/t.pt"],
    ],
    ids=["slim", "report", "finetune"],
)
def test_non_finite_weights_are_named_in_one_line(
    nan_checkpoint: Path, tmp_path: Path, command: list[str]
) -> None:
    argv = [a.replace("{ckpt}", str(nan_checkpoint)).replace("{tmp}", str(tmp_path)) for a in command]
    failed(cli(*argv), "non-finite weights", "layer2.0.conv1.weight")
    assert not any(tmp_path.iterdir())


def test_weights_that_diverge_are_never_saved_as_last_good_or_best(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    from prunekit.trainer import Trainer

    real_epoch = Trainer.train_one_epoch

    def poison_in_epoch_two(self: Any, *a: Any, **k: Any) -> dict:
        stats = real_epoch(self, *a, **k)
        if self.epoch == 1:  # the second epoch: its weights go non-finite without a non-finite loss
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.dim() == 4).fill_(float("inf"))
        return stats

    monkeypatch.setattr(Trainer, "train_one_epoch", poison_in_epoch_two)
    result = cli("finetune", gated, "--data", data, *FT, "--epochs", "3", "--decide-at", "0.1", "-o", out)
    failed(
        result,
        "the weights became non-finite in epoch 2",
        f"the last good checkpoint is {out} (after epoch 1)",
    )
    assert load_checkpoint(out).history[-1]["epoch"] == 1  # loads: finite
    best = out.with_name("tuned.best.pt")
    assert not best.exists() or load_checkpoint(best).history[-1]["epoch"] == 1


def test_a_non_finite_loss_names_the_last_good_checkpoint(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, data = tiny
    out = tmp_path / "tuned.pt"
    # one step at lr 1e30 leaves huge but finite weights (epoch 1 is saved); epoch 2's loss is not finite
    result = cli("finetune", gated, "--data", data, *FT, "--epochs", "2", "--lr", "1e30", "-o", out)
    failed(result, "non-finite loss at epoch 2", f"the last good checkpoint is {out} (after epoch 1)")
    assert load_checkpoint(out).history[-1]["epoch"] == 1


# -- 9. run directories and half-done work -----------------------------------------------------------------


def _run_config(tmp_path: Path, export: str, data: str = "builtin") -> Path:
    config = tmp_path / f"run-{export}.toml"
    config.write_text(
        '[model]\narch = "resnet18"\nnum_classes = 10\ninput_shape = 32\n'
        f'[finetune]\ndata = "{data}"\ntarget_macs = 0.5\nepochs = 1\nmax_steps_per_epoch = 1\nworkers = 0\n'
        f'batch_size = 16\n[slim]\nexport = "{export}"\n'
    )
    return config


def test_a_second_run_in_a_directory_leaves_none_of_the_first_runs_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = cli("run", _run_config(tmp_path, "onnx"), "-o", run_dir, "--json")
    assert first.exit_code == 0, first.stderr
    assert (run_dir / "model.onnx").exists()
    (run_dir / "notes.txt").write_text("mine")  # not a run file: left alone
    killed = run_dir / ".model.onnx.999999999.x.tmp.onnx"  # what a killed write would leave
    killed.write_text("half")
    second = cli("run", _run_config(tmp_path, "none"), "-o", run_dir, "--json")
    assert second.exit_code == 0, second.stderr
    import json

    report = json.loads((run_dir / "report.json").read_text())
    assert not (run_dir / "model.onnx").exists() and not killed.exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert set(report["files"]) <= {
        "gated",
        "tuned",
        "slim",
        "plan",
        "metrics",
        "report",
        "plot_training",
        "plot_widths",
    }
    assert all(Path(p).exists() for p in report["files"].values())


@pytest.mark.parametrize("bad", ["missing-data", "run-dir-is-a-file", "bad-key"])
def test_run_refuses_before_any_stage_writes(tmp_path: Path, bad: str) -> None:
    run_dir = tmp_path / "run"
    config = _run_config(
        tmp_path, "onnx", data=str(tmp_path / "nowhere") if bad == "missing-data" else "builtin"
    )
    if bad == "run-dir-is-a-file":
        run_dir.write_text("a file")
    if bad == "bad-key":
        config.write_text(config.read_text() + "epoch = 3\n")
    before = snapshot(tmp_path)
    fragment = {"missing-data": "data folder not found", "run-dir-is-a-file": "is not a directory"}.get(
        bad, "epoch"
    )
    failed(cli("run", config, "-o", run_dir), fragment)
    assert snapshot(tmp_path) == before


def test_demo_onto_an_existing_file_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "demo-run"
    target.write_text("mine")
    failed(cli("demo", "--out-dir", target), "is not a directory")
    assert target.read_text() == "mine"


# -- 10. every error looks the same ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["gate", "resnet18", "--granularity", "0", "-o", "{tmp}/g.pt"], "Invalid value for '--granularity'"),
        (["gate", "resnet18", "--input-shape", "1", "-o", "{tmp}/g.pt"], "too small"),
        (["gate", "resnet18", "-o", "{tmp}"], "is a directory"),
        (["gate", "-o", "{tmp}/g.pt"], "Missing argument"),
        (["gate", "resnet18", "--bogus", "-o", "{tmp}/g.pt"], "No such option: --bogus"),
        (["slim", "{tmp}/x.pt", "--export", "tflite", "-o", "{tmp}/m.onnx"], "export must be onnx, pt2"),
        (["frobnicate"], "No such command"),
        (["finetune", "{tmp}/g.pt", "--epochs", "many", "-o", "{tmp}/t.pt"], "Invalid value for '--epochs'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    before = snapshot(tmp_path)
    failed(cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]), fragment)
    assert snapshot(tmp_path) == before


def test_slim_on_an_onnx_file_says_what_it_is(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, _ = tiny
    onnx_file = tmp_path / "model.onnx"
    assert cli("slim", gated, "--export", "onnx", "-o", onnx_file).exit_code == 0
    renamed = tmp_path / "model.bin"  # the content, not the name, gives it away
    shutil.copy(onnx_file, renamed)
    for path in (onnx_file, renamed):
        failed(cli("slim", path, "-o", tmp_path / "again.onnx"), "looks like an ONNX model")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    failed(cli("slim", empty, "-o", tmp_path / "again.onnx"), "the file is empty")


def test_slim_refuses_data_with_another_class_count(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    gated, _ = tiny  # 3 classes; the built-in data has 10
    out = tmp_path / "m.onnx"
    failed(cli("slim", gated, "--data", "builtin", "-o", out), "the data has 10 classes but the model 3")
    assert not out.exists()


def test_models_marks_a_truncated_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.models import cache_state

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    assert [cache_state(p) for p in (good, truncated, tmp_path / "none.pth")] == ["ok", "damaged", "missing"]
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # what TORCH_HOME sets
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(truncated, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    result = cli("models", "--filter", "resnet18", "--json")
    assert result.exit_code == 0
    import json

    (row,) = [r for r in json.loads(result.stdout)["models"] if r["model"] == "resnet18"]
    assert row["cached"] is False and row["cache_damaged"] is True


def test_a_reader_that_closes_the_pipe_early_is_not_a_bug() -> None:
    for args in (["models"], ["--help"], ["models", "--help"]):
        proc = subprocess.run(
            f"{EXE} {' '.join(args)} | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stdout.strip() in {"0", "141"}, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
