"""Where training runs: the one device policy, the process group, and which process writes files.

Every stage asks `resolve_runtime` (or is handed a Runtime) instead of choosing a device itself.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `resolve_runtime` joins the process group: `gloo`
on CPU, `nccl` on CUDA, one device per local rank, and a timeout on every collective so that a dead peer
becomes an error instead of a hang. The Runtime then wraps the trained model in DistributedDataParallel,
shards evaluation, and sums counts across processes; `is_primary` (rank 0) alone writes files and
prints. With one process every one of these is a no-op.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from prunekit.config import DEVICES
from prunekit.errors import ConfigError

DEFAULT_TIMEOUT_S = 300  # seconds a collective may wait for a peer before the run fails


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every example on exactly one process, none repeated (unlike
    DistributedSampler, which pads the last shard). For evaluation, whose counts are then summed."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world = len(dataset), rank, world_size  # type: ignore[arg-type]

    def __iter__(self):  # noqa: ANN204
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this Runtime joined the process group, so it leaves it (`close`)

    @property
    def is_primary(self) -> bool:
        """The process that writes files and prints progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype where mixed precision is on by default: bfloat16 on CUDA, none on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    # -- data -------------------------------------------------------------------------------------
    def train_sampler(self, seed: int) -> Any:
        """The sampler factory for training data: a seeded DistributedSampler under torchrun (each
        process sees its 1/world of every epoch), None (a seeded shuffle) otherwise."""
        if not self.distributed:
            return None
        from torch.utils.data.distributed import DistributedSampler

        return lambda ds: DistributedSampler(ds, self.world_size, self.rank, shuffle=True, seed=seed)

    def eval_sampler(self) -> Any:
        if not self.distributed:
            return None
        return lambda ds: ShardSampler(ds, self.rank, self.world_size)

    # -- collectives (no-ops in one process) --------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """One object from every process, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics). Each process updates them with its
        own batches; before an evaluation every process must hold the model rank 0 saves."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for buffer in model.buffers():
            if buffer.dtype == torch.bool:  # gloo has no bool type
                as_bytes = buffer.data.to(torch.uint8)
                dist.broadcast(as_bytes, src=0)
                buffer.data.copy_(as_bytes.bool())
            else:
                dist.broadcast(buffer.data, src=0)

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- models -------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DistributedDataParallel under torchrun (gradients all-reduced), else
        the model itself. Wrap again after parameters stop requiring gradients."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Leave the process group if this Runtime joined it."""
        if self.owns_group:
            shutdown()

    def seed(self, seed: int) -> None:
        """Seed this process: the same seed as a single process on rank 0, an offset one elsewhere, so
        every process draws its own Gumbel noise for its own examples."""
        torch.manual_seed(seed + self.rank)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: the local rank's CUDA device when there is one, else the CPU."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_runtime(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Runtime:
    """The runtime of this process; under torchrun, joins (once) the process group torchrun set up."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    joined = world > 1 and _join_process_group(dev, timeout_s)
    return Runtime(dev, rank, world, local_rank, owns_group=joined)


def _join_process_group(device: torch.device, timeout_s: float) -> bool:
    """Join torchrun's process group; False when the caller had joined it already."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (at the end of a distributed run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decisions_hash(states: torch.Tensor) -> str:
    """A short fingerprint of gate decisions, to compare them across processes."""
    return hashlib.sha256(bytes(states.to(torch.uint8).cpu().tolist())).hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel / torch.compile wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod  # torch.compile's wrapper (checked by name: its class is private)
        else:
            return model


__all__ = [
    "Runtime",
    "ShardSampler",
    "decisions_hash",
    "model_device",
    "resolve_device",
    "resolve_runtime",
    "shutdown",
    "unwrap",
]
