"""Where training runs: the one device policy, process rank, and which process writes files.

Every stage asks `resolve_runtime` (or is handed a Runtime) instead of choosing a device itself. Today a
run is one process; the fields that multi-process training needs (rank, world size, local rank) are read
from torchrun's environment variables so that the seam exists where DDP will plug in, and `is_primary`
already decides who writes checkpoints and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.config import DEVICES
from prunekit.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_primary(self) -> bool:
        """The process that writes files and prints progress (rank 0)."""
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype where mixed precision is on by default: bfloat16 on CUDA, none on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: the local rank's CUDA device when there is one, else the CPU."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_runtime(device: str = "auto") -> Runtime:
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world > 1:
        raise ConfigError(
            f"WORLD_SIZE={world}: multi-process fine-tuning (torchrun) is not supported yet; run one process"
        )
    return Runtime(resolve_device(device, local_rank), rank, world, local_rank)


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


__all__ = ["Runtime", "resolve_device", "resolve_runtime", "unwrap"]
