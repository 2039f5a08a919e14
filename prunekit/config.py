"""Every setting prunekit has, with its default, in one torch-free module.

The CLI reads its option defaults from these dataclasses (so no default is written twice), the TOML
loader of `prunekit run` fills them, and the Python API takes them. Importing this module never imports
torch: `prunekit --help` stays fast.

TOML sections of a `prunekit run` config (every key optional but the model's source, data and target):

[model]      arch, weights, num_classes, input_shape, mean, std, args (a table of factory arguments),
             resize_size, interpolation (evaluation preprocessing; torchvision weights set their own)
[gates]      granularity, min_keep, init_on, init_off, init_spread, importance, importance_batches,
             dynamic                                                                     (GateConfig)
[finetune]   data, target_macs, epochs, batch_size, lr, ...           (FinetuneConfig)
[slim]       export ("onnx" | "pt2" | "onnx,pt2" | "none"), opset, latency, threads, quantize
             ("int8" | "fp16" | "int8,fp16"), calibration_batches, max_quantization_drop, drop_never_on
             (SlimConfig)
[ci]         max_accuracy_drop (percentage points; the run fails with exit code 3 beyond it)
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunekit.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
EXPORT_FORMATS = ("onnx", "pt2")  # --export takes one, both (onnx,pt2) or none
EXPORTS = (*EXPORT_FORMATS, "none")
QUANTIZE_MODES = ("int8", "fp16")  # quantised copies of the ONNX file (prunekit.quantize)
DEFAULT_OPSET = 18
DEFAULT_THREADS = 2  # onnxruntime / torch threads for latency measurements


# --------------------------------------------------------------------------------------------------
# the model's identity
# --------------------------------------------------------------------------------------------------


def parse_input_shape(value: Any) -> tuple[int, int, int]:
    """(C, H, W) from a sequence of 3 ints, "C,H,W", or one int / "S" meaning (3, S, S)."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"input shape must be C,H,W or one side length, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"input shape must be C,H,W or one side length, got {value!r}")
    if len(value) == 1:
        value = [3, value[0], value[0]]
    if len(value) != 3:
        raise ConfigError(f"input shape must have 3 values (C, H, W), got {len(value)}")
    c, h, w = value
    if c < 1 or h < 8 or w < 8:
        raise ConfigError(f"input shape {c},{h},{w} is too small (at least 1 channel and 8x8 pixels)")
    if c > 1024 or max(h, w) > 16384:
        raise ConfigError(
            f"input shape {c},{h},{w} is too large (at most 1024 channels and 16384 pixels a side)"
        )
    return (c, h, w)


def parse_model_arg(text: str) -> tuple[str, Any]:
    """`name=value` from --model-arg: the value is read as a TOML value (10, 0.5, true, "x", [1, 2]), and
    taken as a plain string when it is not one (--model-arg act=relu)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise ConfigError(f"--model-arg takes name=value, got {text!r}")
    try:
        return name, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return name, value.strip()


def _stats(value: Any, name: str, channels: int | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    try:
        stats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} takes comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if channels is not None and len(stats) != channels:
        raise ConfigError(f"{name} needs {channels} values (one per input channel), got {len(stats)}")
    if not all(math.isfinite(v) for v in stats) or (name == "std" and not all(v > 0 for v in stats)):
        raise ConfigError(f"{name} must be finite{' and positive' if name == 'std' else ''}, got {stats}")
    return stats


MAX_CLASSES = 10**6  # far above any classifier's; a typo beyond it would only fail later, in allocation
# torchvision InterpolationMode values (`.value`) that resize tensors and PIL images alike
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


def _resize_size(value: Any, input_shape: tuple[int, int, int] | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16384:
        raise ConfigError(f"resize_size must be an integer from 1 to 16384 pixels, got {value!r}")
    if input_shape is not None and value < max(input_shape[1:]):
        raise ConfigError(
            f"resize_size {value} is smaller than the {input_shape[1]}x{input_shape[2]} crop "
            "(the shorter side is resized to it, then centre-cropped)"
        )
    return value


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and what it expects: the one description of a model's identity.

    `source` names where the architecture comes from (a torchvision name, `module:factory`,
    `file.py:factory` or `timm:NAME`, see prunekit.models.resolve_source); None means an
    `nn.Module` handed over in memory, which a checkpoint cannot rebuild on its own. Fields left None
    are filled from the source and its weights by `prunekit.models.load_model`; a checkpoint always
    stores a complete spec."""

    source: str | None
    weights: str | None = None  # torchvision weights name or a local state_dict file (informational)
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None  # (C, H, W) of one example
    mean: tuple[float, ...] | None = None  # per-channel input normalisation the weights expect
    std: tuple[float, ...] | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the source's factory
    # evaluation preprocessing of large inputs, as the weights' own preset (torchvision's
    # `weights.transforms()`): resize the shorter side to `resize_size` with `interpolation` (an
    # InterpolationMode value, e.g. "bilinear", "bicubic"), then centre-crop to input_shape. None: the
    # default, 256/224 of the crop and bilinear (prunekit.data)
    resize_size: int | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_args, dict) or not all(isinstance(k, str) for k in self.model_args):
            raise ConfigError(f"model arguments must be a table of name = value, got {self.model_args!r}")
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", parse_input_shape(self.input_shape))
        channels = self.input_shape[0] if self.input_shape else None
        object.__setattr__(self, "mean", _stats(self.mean, "mean", channels))
        object.__setattr__(self, "std", _stats(self.std, "std", channels))
        object.__setattr__(self, "resize_size", _resize_size(self.resize_size, self.input_shape))
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or not 1 <= self.num_classes <= MAX_CLASSES
        ):
            raise ConfigError(
                f"num_classes must be an integer from 1 to {MAX_CLASSES}, got {self.num_classes!r}"
            )

    @property
    def name(self) -> str:
        return self.source or "in-memory model"

    @property
    def complete(self) -> bool:
        return None not in (self.num_classes, self.input_shape, self.mean, self.std)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A seeded random batch (batch, C, H, W): the same tensor on every call."""
        import torch

        if self.input_shape is None:
            raise ConfigError(f"the input shape of {self.name} is unknown: give input_shape=(C, H, W)")
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, *self.input_shape, generator=generator)

    def with_defaults(self, **defaults: Any) -> ModelSpec:
        """This spec with every field that is None taken from `defaults`."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def with_input_shape(self, input_shape: Any) -> ModelSpec:
        """This spec at another input shape. `resize_size` keeps its ratio to the crop (the crop fraction
        of the weights' preset, rounded: 232 for 224 becomes 331 for 320); for a non-square shape it
        goes back to None (the default rule, which handles any shape)."""
        shape = parse_input_shape(input_shape)
        resize = self.resize_size
        if resize is not None and self.input_shape is not None and shape != self.input_shape:
            _, h, w = self.input_shape
            _, new_h, new_w = shape
            resize = round(new_h * resize / h) if h == w and new_h == new_w else None
        return replace(self, input_shape=shape, resize_size=resize)

    def preprocessing(self) -> dict[str, Any]:
        """What `prunekit.data.resolve_data` needs to feed this model: input shape, normalisation and the
        evaluation resize (`resolve_data(data, **spec.preprocessing(), ...)`)."""
        return {
            "input_shape": self.input_shape,
            "mean": self.mean,
            "std": self.std,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "weights": self.weights,
            "num_classes": self.num_classes,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "model_args": dict(self.model_args),
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Also reads the checkpoint format 1 layout (`arch`, square `input_size`), and specs written
        before `resize_size` / `interpolation` existed (None: the default evaluation preprocessing)."""
        if "input_shape" not in d and "input_size" in d:
            d = {**d, "input_shape": [3, int(d["input_size"]), int(d["input_size"])]}
        return cls(
            source=d.get("source", d.get("arch")),
            weights=d.get("weights"),
            num_classes=None if d.get("num_classes") is None else int(d["num_classes"]),
            input_shape=None if d.get("input_shape") is None else tuple(int(x) for x in d["input_shape"]),
            mean=d.get("mean"),
            std=d.get("std"),
            model_args=dict(d.get("model_args") or {}),
            resize_size=d.get("resize_size"),
            interpolation=d.get("interpolation"),
        )


# --------------------------------------------------------------------------------------------------
# stage settings
# --------------------------------------------------------------------------------------------------


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_types(obj: Any) -> None:
    """Every int, float, bool and str field holds one (a TOML `epochs = 1.5` or `latency = "no"` is
    an error that names the key, not a value read some other way later)."""
    for f in fields(obj):
        declared = str(f.type).replace(" ", "")
        optional = declared.endswith("|None")
        base = declared.removesuffix("|None")
        value = getattr(obj, f.name)
        if base not in _SIMPLE_TYPES or (optional and value is None):
            continue
        if not isinstance(value, _SIMPLE_TYPES[base]) or (isinstance(value, bool) and base != "bool"):
            raise ConfigError(f"{f.name} must be {'an' if base == 'int' else 'a'} {base}, got {value!r}")
        if base == "float" and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if base == "int" and not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ConfigError(f"{f.name} is out of range: {value}")


GATE_PHASES = ("joint", "frozen")  # FinetuneConfig.gate_phase
METHODS = ("auto", "gumbel", "magnitude", "sensitivity")  # FinetuneConfig.method
ALLOCATIONS = ("learned", "uniform")  # FinetuneConfig.allocation
GATE_OPTIMIZERS = ("adam", "shared-adam")  # FinetuneConfig.gate_optimizer
IMPORTANCE_KINDS = ("l1", "bn", "taylor")  # GateConfig.importance (prunekit.plan.IMPORTANCE)
# GateConfig.min_keep when not given. Static: a group's first gate, about; the sensitivity method
# measures how far each group can go (it cuts some blocks' inner widths to 1/16 on the CIFAR fixture) and
# the learned gates' floors come from the uniform cut (FinetuneConfig.uniform_floor)
STATIC_MIN_KEEP, DYNAMIC_MIN_KEEP = 0.05, 0.25
STATIC_GRANULARITY, DYNAMIC_GRANULARITY = 8, 16  # GateConfig.granularity when not given


# FinetuneConfig fields whose default differs from how a run saved before they existed behaved
_BEFORE_THEY_EXISTED: dict[str, Any] = {"uniform_floor": None}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> tuple[bool, str]:
    return value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}"


_INT_LIMIT = 2**63  # what torch and numpy take as an integer argument
SEED_LIMIT = 2**32  # numpy's and DataLoader workers' seeds are 32-bit: seeds are 0 .. 2**32 - 1


@dataclass(frozen=True)
class GateConfig:
    # channels per gate (surviving widths come out in multiples of it); None: 8, or 16 with dynamic
    # gates, whose gate networks cost MACs per gate
    granularity: int | None = None
    # fraction of each group always kept (its most important gates; docs/recipe.md); None: 0.05, or
    # 0.25 with dynamic gates, which have only the blocks' internal widths to spend the budget on
    min_keep: float | None = None
    init_on: float = 4.0  # initial on-logit of the most important gate (paper: [0.1, 4] for every gate)
    init_off: float = 0.1  # initial off-logit
    init_spread: float = 2.0  # the least important gate starts with its on-logit lowered by this much
    # how channels are ranked within a group (which form a gate, which are always kept, the initial
    # logits): "l1", group L1 magnitude of every weight they touch; "bn", BatchNorm scale; "taylor",
    # group first-order Taylor |weight * grad| from the loss on `importance_batches` training batches
    # (the gate stage then needs data)
    importance: str = "l1"
    importance_batches: int = 8
    # input-dependent gates (conditional computation, prunekit.dynamic) on the internal widths of
    # residual blocks, decided per example by a small gate network reading the block's input
    dynamic: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        # frozen: the resolved defaults are what to_dict records
        if self.min_keep is None:
            object.__setattr__(self, "min_keep", DYNAMIC_MIN_KEEP if self.dynamic else STATIC_MIN_KEEP)
        if self.granularity is None:
            object.__setattr__(
                self, "granularity", DYNAMIC_GRANULARITY if self.dynamic else STATIC_GRANULARITY
            )
        _check(
            [
                (self.granularity >= 1, f"granularity must be >= 1, got {self.granularity}"),  # type: ignore[operator]
                (0.0 <= self.min_keep < 1.0, f"min_keep must be in [0, 1), got {self.min_keep}"),  # type: ignore[operator]
                _choice("importance", self.importance, IMPORTANCE_KINDS),
                (
                    self.importance_batches >= 1,
                    f"importance_batches must be >= 1, got {self.importance_batches}",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    target_macs: float | None = None  # fraction of the whole model's MACs to keep (fvcore count)
    # or a latency budget: "0.5" (of the original's onnxruntime CPU latency at batch 1) or "12ms"
    target_latency: str | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01  # weights: SGD momentum 0.9, cosine decay per step
    gate_lr: float = 0.05  # gate logits: Adam
    # "adam": per-element Adam; "shared-adam": one second-moment scale for all the gates, so their
    # steps keep the objective's relative sizes (prunekit.gate_optim.SharedScaleAdam)
    gate_optimizer: str = "adam"
    weight_decay: float = 1e-4
    gate_weight_decay: float = 0.0
    lam: float = 5.0  # weight of the activation loss
    tau: float = 1.0  # Gumbel-softmax temperature at the start
    tau_end: float | None = None  # anneal geometrically to this by the decision point (None: constant)
    one_sided: bool = False  # penalise only B > t
    decide_at: float = 0.2  # fraction of training steps after which gate decisions are fixed
    # how the channels to keep are chosen: "gumbel", the learned gates (the paper's method);
    # "magnitude", the same fraction of every group by the gate ranking (`gate --importance`), decided
    # before the first step, every step fine-tuning the slimmed model (a baseline inside the pipeline);
    # "sensitivity", every group's cost measured on a few training batches (prunekit.sensitivity) sets
    # how many gates it keeps, the gate ranking which, decided before the first step as magnitude is;
    # "auto", sensitivity for static gates (it leads on the peer benchmark, docs/benchmarks.md) and
    # gumbel for dynamic ones (the only method that learns per-example gates); `resolve_method`
    method: str = "auto"
    sensitivity_batches: int = 4  # method sensitivity: training batches the measurement runs on
    # learned gates: every group keeps at least this share of the gates the uniform cut to the same
    # budget keeps it (prunekit.allocation; None or 0: only the gate stage's min_keep; docs/recipe.md)
    uniform_floor: float | None = 0.85
    # learned gates: "learned", the margins decide how many gates every group keeps and which;
    # "uniform", every group keeps the uniform cut's number of gates, the margins choose which
    allocation: str = "learned"
    # until the decision: "joint", weights and gates train together (the paper); "frozen", only the
    # gates train, on the pretrained weights, and the weights start training from the decided model
    gate_phase: str = "joint"
    distill: float = 0.7  # weight of distillation from the ungated model (temperature 2)
    bn_recalibrate: int = 0  # batches used to re-estimate BatchNorm statistics before evaluation
    workers: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16 autocast on CUDA
    max_steps_per_epoch: int | None = None  # cap (quick runs, tests)
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch
    strict_data: bool = False  # image files that do not decode: an error (default: skipped, with a warning)

    def __post_init__(self) -> None:
        if isinstance(self.target_latency, int | float) and not isinstance(self.target_latency, bool):
            object.__setattr__(self, "target_latency", str(self.target_latency))  # TOML: 0.5 or "12ms"
        _check_types(self)
        if (self.target_macs is None) == (self.target_latency is None):
            raise ConfigError("give one budget: target_macs (a fraction of the MACs) or target_latency")
        if self.target_latency is not None:
            parse_target_latency(self.target_latency)  # validates
        _check(
            [
                (
                    self.target_macs is None or 0.0 < self.target_macs < 1.0,
                    f"target_macs must be between 0 and 1, got {self.target_macs}",
                ),
                (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
                (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                (self.lr > 0 and self.gate_lr > 0, "learning rates must be positive"),
                (self.lam >= 0, f"lambda must be >= 0, got {self.lam}"),
                (self.tau > 0 and (self.tau_end is None or self.tau_end > 0), "tau must be positive"),
                (0.0 < self.decide_at <= 1.0, f"decide_at must be in (0, 1], got {self.decide_at}"),
                _choice("gate_optimizer", self.gate_optimizer, GATE_OPTIMIZERS),
                _choice("method", self.method, METHODS),
                (
                    self.sensitivity_batches >= 1,
                    f"sensitivity_batches must be >= 1, got {self.sensitivity_batches}",
                ),
                _choice("allocation", self.allocation, ALLOCATIONS),
                (
                    self.uniform_floor is None or 0.0 <= self.uniform_floor <= 1.0,
                    f"uniform_floor must be in [0, 1], got {self.uniform_floor}",
                ),
                (
                    self.method == "gumbel" or self.gate_phase == "joint",
                    f"gate_phase {self.gate_phase!r} needs method gumbel: {self.method!r} trains no gates"
                    if self.method != "auto"
                    else f"gate_phase {self.gate_phase!r} needs method gumbel (the learned gates): give "
                    "--method gumbel",
                ),
                _choice("gate_phase", self.gate_phase, GATE_PHASES),
                (0.0 <= self.distill <= 1.0, f"distill must be in [0, 1], got {self.distill}"),
                (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device}"),
                (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
                (0 <= self.seed < SEED_LIMIT, f"seed must be in 0 .. {SEED_LIMIT - 1}, got {self.seed}"),
                (
                    self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
                    f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}",
                ),
            ]
        )

    def resolve_method(self, dynamic: bool) -> FinetuneConfig:
        """This config with method "auto" made concrete for a bank of this kind (what a run records)."""
        if self.method != "auto":
            return self
        return replace(self, method="gumbel" if dynamic else "sensitivity")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """A saved run's config. Settings it predates take the value that reproduces how it ran."""
        names = {f.name for f in fields(cls)}
        return cls(**(_BEFORE_THEY_EXISTED | {k: v for k, v in d.items() if k in names}))


def parse_target_latency(value: str | float | None) -> tuple[str, float] | None:
    """ "0.5" -> ("fraction", 0.5) of the original's latency; "12ms" / "12.5 ms" -> ("ms", 12.5)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    unit = "fraction"
    if text.endswith("ms"):
        unit, text = "ms", text[:-2].strip()
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(
            f"target_latency must be a fraction of the original's latency (0.5) or milliseconds (12ms), "
            f"got {value!r}"
        ) from None
    if not math.isfinite(number) or number <= 0 or (unit == "fraction" and number >= 1):
        raise ConfigError(
            f"target_latency must be a fraction between 0 and 1 (exclusive) or a positive time in ms, "
            f"got {value!r}"
        )
    return unit, number


# What `--resume` may change about a saved run: these alter how it runs, not what it computes up to now.
# `epochs` may only grow (a longer run continues the same schedule with a longer horizon).
RESUME_MUTABLE = ("epochs", "workers", "device", "amp")


@dataclass(frozen=True)
class SlimConfig:
    export: str = "onnx"  # onnx | pt2 | onnx,pt2 | none: the first format is written at -o
    opset: int = DEFAULT_OPSET
    latency: bool = False  # time original vs slim (vs quantised) in onnxruntime (batch 1, interleaved)
    threads: int = DEFAULT_THREADS
    rtol: float = 1e-4  # slim vs gated and ONNX vs PyTorch: max |diff| <= rtol * max |reference|
    quantize: str | None = None  # int8 | fp16 | int8,fp16: quantised copies of the ONNX file (need data)
    calibration_batches: int = 8  # INT8: batches of 32 images of the data's training split
    max_quantization_drop: float | None = None  # percentage points of top-1 vs FP32; beyond: exit 3
    # dynamic gates: remove for good the channels no calibration image (the data's training split,
    # calibration_batches batches of 32) turns on; changes the output of inputs that would
    drop_never_on: bool = False

    def __post_init__(self) -> None:
        for name in ("export", "quantize"):  # TOML may give a list: ["onnx", "pt2"]
            value = getattr(self, name)
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, name, ",".join(value))
        _check_types(self)
        formats = self.formats  # validates
        modes = self.quantize_modes
        drop = self.max_quantization_drop
        _check(
            [
                (self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
                (self.rtol > 0, f"rtol must be positive, got {self.rtol}"),
                (
                    self.calibration_batches >= 1,
                    f"calibration_batches must be >= 1, got {self.calibration_batches}",
                ),
                (not modes or "onnx" in formats, "quantize makes copies of the ONNX file: export onnx too"),
                (drop is None or drop >= 0, f"max_quantization_drop must be >= 0, got {drop}"),
                (drop is None or bool(modes), "max_quantization_drop needs quantize (int8 or fp16)"),
            ]
        )

    @property
    def formats(self) -> tuple[str, ...]:
        """The export formats in the given order; () for "none"."""
        names = _listed(self.export)
        if names == ("none",):
            return ()
        unknown = [n for n in names if n not in EXPORT_FORMATS]
        if unknown or not names:
            raise ConfigError(f"export must be onnx, pt2, onnx,pt2 or none, got {self.export!r}")
        return names

    @property
    def quantize_modes(self) -> tuple[str, ...]:
        if self.quantize is None:
            return ()
        names = _listed(self.quantize)
        unknown = [n for n in names if n not in QUANTIZE_MODES]
        if unknown or not names:
            bad = unknown[0] if unknown else self.quantize
            raise ConfigError(f"unknown quantisation mode {bad!r}: use int8, fp16 or int8,fp16")
        return names


def _listed(value: str) -> tuple[str, ...]:
    """ "a,b" -> ("a", "b"): lower-case, stripped, each once."""
    names: list[str] = []
    for part in value.split(","):
        part = part.strip().lower()
        if part and part not in names:
            names.append(part)
    return tuple(names)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    data: str
    finetune: FinetuneConfig
    gates: GateConfig = field(default_factory=GateConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    max_accuracy_drop: float | None = None  # percentage points

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict()
        return {
            "model": {"arch": model.pop("source"), "args": model.pop("model_args"), **model},
            "gates": self.gates.to_dict(),
            "finetune": {"data": self.data, **self.finetune.to_dict()},
            "slim": asdict(self.slim),
            "ci": {"max_accuracy_drop": self.max_accuracy_drop},
        }


def defaults(cls: type) -> dict[str, Any]:
    """Field name -> default of a config dataclass (fields without a default are left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# --------------------------------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------------------------------

_MODEL_KEYS = {
    "arch",
    "weights",
    "num_classes",
    "input_shape",
    "mean",
    "std",
    "args",
    "resize_size",
    "interpolation",
}


def _section(data: dict[str, Any], name: str, known: set[str], renames: dict[str, str] | None = None) -> dict:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    out = {}
    for key, value in raw.items():
        key = (renames or {}).get(key, key).replace("-", "_")
        if key not in known:
            shown = sorted({_TOML_NAMES.get(k, k) for k in known})
            hint = _did_you_mean(key, shown)
            raise ConfigError(f"unknown key {key!r} in [{name}]{hint} (known: {', '.join(shown)})")
        out[key] = value
    return out


_TOML_NAMES = {"lam": "lambda"}  # field -> its TOML key (and CLI flag), where they differ


def _did_you_mean(word: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else ""


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def parse_run_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from parsed TOML; `overrides` ("section.key": value) come from CLI flags."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".")
            data.setdefault(section, {})[key] = value
    sections = ["model", "gates", "finetune", "slim", "ci"]
    unknown = sorted(set(data) - set(sections))
    if unknown:
        hint = _did_you_mean(unknown[0], sections)
        raise ConfigError(
            f"unknown section [{unknown[0]}] in the config{hint} (sections: {', '.join(sections)})"
        )
    model = _section(data, "model", _MODEL_KEYS)
    if "arch" not in model:
        raise ConfigError(
            'the config needs [model] arch = "<model source: torchvision name, module:factory, ...>"'
        )
    ft = dict(data.get("finetune", {}))
    dataset = ft.pop("data", None)
    if dataset is None:
        raise ConfigError('the config needs [finetune] data = "builtin" or a folder')
    if "target_macs" not in ft and "target-macs" not in ft:
        raise ConfigError("the config needs [finetune] target_macs = <fraction of MACs to keep>")
    ft_args = _section({"finetune": ft}, "finetune", _names(FinetuneConfig), {"lambda": "lam"})
    ci = _section(data, "ci", {"max_accuracy_drop"})
    drop = ci.get("max_accuracy_drop")
    if drop is not None and (
        isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop)
    ):
        raise ConfigError(f"max_accuracy_drop must be a finite number of points, got {drop!r}")
    try:
        return RunConfig(
            model=ModelSpec(source=str(model.pop("arch")), model_args=model.pop("args", {}), **model),
            data=str(dataset),
            finetune=FinetuneConfig(**ft_args),
            gates=GateConfig(**_section(data, "gates", _names(GateConfig))),
            slim=SlimConfig(**_section(data, "slim", _names(SlimConfig))),
            max_accuracy_drop=None if drop is None else float(drop),
        )
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc


def load_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_run_config(data, overrides)


__all__ = [
    "DEFAULT_OPSET",
    "DEVICES",
    "EXPORTS",
    "EXPORT_FORMATS",
    "QUANTIZE_MODES",
    "parse_target_latency",
    "FinetuneConfig",
    "GateConfig",
    "ModelSpec",
    "RESUME_MUTABLE",
    "RunConfig",
    "SlimConfig",
    "defaults",
    "load_run_config",
    "parse_run_config",
    "parse_input_shape",
    "parse_model_arg",
]
