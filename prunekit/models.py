"""Model sources: what builds a model from its name, and its weights from the hub cache or a local file.

`resolve_source` is the one seam where a source string becomes a builder: torchvision names here,
`module:factory`, `file.py:factory` and `timm:NAME` in prunekit.sources.

prunekit never downloads: torchvision weights must already be in the torch hub cache
($TORCH_HOME/hub/checkpoints), otherwise loading fails with the file name it expected.
"""

from __future__ import annotations

import difflib
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from prunekit.config import ModelSpec
from prunekit.errors import ConfigError, UnknownModelError, WeightsError, first_line
from prunekit.sources import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_INPUT_SIZE = 224
TORCHVISION_NUM_CLASSES = 1000  # what get_model builds when num_classes is not given

# Per-architecture overrides, as data. Without weights, torchvision builds vit_h_14 for 224 px inputs
# (fixed position embeddings) although its DEFAULT weights are 518 px.
_INPUT_SIZE_WITHOUT_WEIGHTS: dict[str, int] = {"vit_h_14": 224}

# Prefixes that training wrappers add to state_dict keys: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WEIGHT_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar"}


@dataclass(frozen=True)
class ModelInfo:
    """One row of `prunekit models`: what torchvision's weights metadata says about an architecture."""

    model: str  # the torchvision name
    weights: tuple[str, ...]  # weights names, e.g. ("IMAGENET1K_V1", "IMAGENET1K_V2")
    default_weights: str | None  # e.g. "ResNet50_Weights.IMAGENET1K_V2"
    params: int | None  # parameters of the DEFAULT weights' model
    macs: int | None  # torchvision's "_ops" (labelled GFLOPS there, but counted as MACs) x 1e9
    input_shape: tuple[int, int, int]  # (C, H, W) the DEFAULT weights expect
    cached: bool  # DEFAULT weights present (and whole) in the hub cache, so loadable offline
    cache_damaged: bool = (
        False  # a file is there but truncated or not a torch file (delete it to re-download)
    )


def list_classification_models() -> list[str]:
    """Names of torchvision's image classification models (no detection, video or quantized ones)."""
    return list(torchvision.models.list_models(module=torchvision.models))


def check_arch(name: str) -> str:
    """Return `name` if it is a classification model, else raise UnknownModelError with close matches."""
    names = list_classification_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}{hint} (`prunekit models` lists the torchvision classification models)"
    )


def default_weights(arch: str) -> WeightsEnum | None:
    """torchvision's DEFAULT weights entry for `arch` (metadata only, nothing is loaded)."""
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        return None


def default_input_size(arch: str, weights: WeightsEnum | None = None) -> int:
    """Input side in pixels: the weights' evaluation crop, else the DEFAULT weights' crop, else 224."""
    if weights is None:
        if arch in _INPUT_SIZE_WITHOUT_WEIGHTS:
            return _INPUT_SIZE_WITHOUT_WEIGHTS[arch]
        weights = default_weights(arch)
    crop = getattr(weights.transforms(), "crop_size", None) if weights is not None else None
    return int(crop[0]) if crop else DEFAULT_INPUT_SIZE


def weights_preprocessing(weights: WeightsEnum) -> dict[str, Any]:
    """The ModelSpec fields of torchvision's evaluation preset for `weights` (`weights.transforms()`,
    an ImageClassification): input_shape (its crop), resize_size, interpolation, mean, std. Metadata
    only: nothing is loaded. A preset without a field leaves it out (the default applies)."""
    preset = weights.transforms()

    def single(value: Any) -> int | None:  # torchvision keeps sizes as one-element lists
        if value is None:
            return None
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    crop, resize = single(getattr(preset, "crop_size", None)), single(getattr(preset, "resize_size", None))
    interpolation = getattr(preset, "interpolation", None)
    fields = {
        "input_shape": None if crop is None else (3, crop, crop),
        "resize_size": resize,
        "interpolation": None if interpolation is None else interpolation.value,
        "mean": tuple(preset.mean) if getattr(preset, "mean", None) is not None else None,
        "std": tuple(preset.std) if getattr(preset, "std", None) is not None else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def hub_cache_file(weights: WeightsEnum) -> Path:
    """Where torchvision looks for (and would download) these weights. Reads TORCH_HOME at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def cache_state(path: Path) -> str:
    """ "missing", "ok" or "damaged": a torch file is a zip archive (whose directory sits at the end, so
    a truncated download has none) or, in the legacy format, a pickle; anything else is damaged. This
    reads a few bytes, not the whole file (torchvision's hash check reads every byte)."""
    import zipfile

    if not path.is_file():
        return "missing"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return "damaged"
    if head == b"PK":
        return "ok" if zipfile.is_zipfile(path) else "damaged"
    return "ok" if head[:1] == b"\x80" else "damaged"


def model_catalog(filter: str | None = None) -> list[ModelInfo]:
    """Classification models whose name contains `filter` (case-insensitive), with weights metadata."""
    rows = []
    for name in list_classification_models():
        if filter and filter.lower() not in name.lower():
            continue
        enum = torchvision.models.get_model_weights(name)
        default = enum.DEFAULT
        ops = default.meta.get("_ops")
        cache = cache_state(hub_cache_file(default))
        rows.append(
            ModelInfo(
                model=name,
                weights=tuple(member.name for member in enum),
                default_weights=str(default),
                params=default.meta.get("num_params"),
                macs=round(ops * 1e9) if ops is not None else None,
                input_shape=(3, default_input_size(name), default_input_size(name)),
                cached=cache == "ok",
                cache_damaged=cache == "damaged",
            )
        )
    return rows


class TorchvisionSource:
    """A torchvision classification model by name: `torchvision.models.get_model` builds it, weights
    come from the hub cache (never downloaded) or a local state_dict file."""

    kind = "torchvision"

    def __init__(self, arch: str) -> None:
        self.arch = arch

    def build(self, num_classes: int | None = None, **model_args: Any) -> nn.Module:
        """A randomly initialised model in eval mode."""
        kwargs = dict(model_args) | ({} if num_classes is None else {"num_classes": num_classes})
        return self._get_model(None, kwargs)

    def _get_model(self, weights: WeightsEnum | None, kwargs: dict[str, Any]) -> nn.Module:
        if "weights" in kwargs:
            raise ConfigError("give weights with --weights, not as a model argument")
        try:
            with warnings.catch_warnings():
                # googlenet / inception_v3 warn about a future change of their default initialisation.
                warnings.filterwarnings("ignore", category=FutureWarning)
                model = torchvision.models.get_model(self.arch, weights=weights, **kwargs)
        except (TypeError, ValueError) as exc:  # an argument the builder does not take, or a bad value
            raise ConfigError(f"{self.arch} does not take {sorted(kwargs)}: {first_line(exc)}") from None
        return model.eval()

    def load(self, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        """Build and load `spec.weights`; return the model (eval mode) and the spec with every default
        filled in: classes from the weights, input shape from their evaluation crop, normalisation and
        evaluation resize from their transforms (else ImageNet's normalisation; see `complete`)."""
        arch, weights, num_classes = self.arch, spec.weights, spec.num_classes
        tv_weights: WeightsEnum | None = None
        if weights is None:
            model = self.build(num_classes, **spec.model_args)
            num_classes = num_classes or TORCHVISION_NUM_CLASSES
        else:
            source = _resolve_weights(arch, weights)
            if isinstance(source, Path):
                model, num_classes = _load_local(self, source, num_classes, spec.model_args)
            else:
                tv_weights = source
                model = _load_from_hub(self, source, spec.model_args)
                categories = len(source.meta["categories"])
                if num_classes is not None and num_classes != categories:
                    replace_head_(model, num_classes)
                num_classes = num_classes or categories
        return model.eval(), self.complete(spec, tv_weights, num_classes)

    def complete(self, spec: ModelSpec, weights: WeightsEnum | None, num_classes: int) -> ModelSpec:
        """`spec` with every field that is None filled in: from torchvision `weights`, their evaluation
        preset (`weights_preprocessing`: crop, resize, interpolation, normalisation); without them,
        the DEFAULT weights' crop and ImageNet's normalisation (resize and interpolation stay None).
        An input shape of the user's own keeps the preset's ratio of resize to crop
        (`ModelSpec.with_input_shape`). Reads no file."""
        channels = spec.input_shape[0] if spec.input_shape else 3
        if channels != 3:
            raise ConfigError(f"{self.arch} takes 3-channel (RGB) inputs, not {channels}")
        size = default_input_size(self.arch, weights)
        preset = ModelSpec(spec.source, input_shape=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if weights is not None:
            preset = replace(preset, **weights_preprocessing(weights))
            if spec.input_shape is not None:
                preset = preset.with_input_shape(spec.input_shape)
        names = ("input_shape", "mean", "std", "resize_size", "interpolation")
        return spec.with_defaults(num_classes=num_classes, **{name: getattr(preset, name) for name in names})


def resolve_source(source: str | None) -> Any:
    """The one place a model source string is turned into something that builds models:
    a torchvision classification model name (close matches are suggested for a typo),
    `package.module:factory`, `path/to/file.py:factory` (see prunekit.sources) or `timm:NAME`."""
    from prunekit.sources import TIMM_PREFIX, FactorySource, TimmSource, is_code_source

    if source is None:
        raise UnknownModelError(
            "this model was handed over in memory and cannot be rebuilt from its name: "
            "pass the model itself (load_checkpoint(path, model=...))"
        )
    if source.startswith(TIMM_PREFIX):
        return TimmSource(source)
    if is_code_source(source):
        return FactorySource(source)
    return TorchvisionSource(check_arch(source))


def build_model(source: str, num_classes: int | None = None, **model_args: Any) -> nn.Module:
    """A randomly initialised model of `source` in eval mode."""
    return resolve_source(source).build(num_classes, **model_args)


def load_model(
    spec: ModelSpec | str, weights: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Build the model `spec` describes and load its weights: None, a torchvision weights name (DEFAULT,
    IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2) from the hub cache, or a local state_dict file.

    `num_classes` with torchvision weights replaces the classifier head with a fresh one; with a local
    file the model is built for that many classes (inferred from the file's head when not given).
    A plain string is shorthand for `ModelSpec(source, weights, num_classes)`."""
    if isinstance(spec, str):
        spec = ModelSpec(spec, weights=weights, num_classes=num_classes)
    return resolve_source(spec.source).load(spec)


def replace_head_(model: nn.Module, num_classes: int) -> str:
    """Replace the last nn.Linear (by module order: the classifier head) with a freshly initialised one
    with `num_classes` outputs. Returns the head's module name."""
    name, head = last_linear(model)
    new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    model.set_submodule(name, new_head.to(device=head.weight.device, dtype=head.weight.dtype))
    return name


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head of a torchvision model: its last nn.Linear in module order."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no Linear classifier head to resize; "
            "load a state_dict trained for your classes instead of --num-classes"
        )
    return found[-1]


def check_runs(model: nn.Module, spec: ModelSpec) -> Any:
    """A user's input shape can be too small for the architecture (or fixed by it, as for ViTs): say so
    in one line instead of failing deep inside analysis with a traceback. Returns the model's output."""
    x = spec.example_input()
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, AssertionError, ValueError) as exc:
        size = "x".join(str(d) for d in x.shape[1:])
        raise ConfigError(
            f"{spec.name} does not run on {size} inputs ({first_line(exc)}); pick another --input-shape"
        ) from exc


# -- internals ---------------------------------------------------------------------------------------------


def _has_linear(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in model.modules())


def _resolve_weights(arch: str, spec: str) -> WeightsEnum | Path:
    """A torchvision weights entry, or the path of an existing local file."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightsError(f"weights path {spec} is a directory; give a state_dict file")
    enum = torchvision.models.get_model_weights(arch)
    cls_name, dot, key = spec.rpartition(".")
    if dot and cls_name.endswith("_Weights"):
        if cls_name != enum.__name__:
            raise WeightsError(f"{spec} are weights for another architecture; {arch} takes {enum.__name__}.*")
    else:
        key = spec
    for candidate in (key, key.upper()):
        if candidate == "DEFAULT":
            return enum.DEFAULT
        if candidate in enum.__members__:
            return enum[candidate]
    if os.sep in spec or "/" in spec or path.suffix in _WEIGHT_FILE_SUFFIXES:
        raise WeightsError(f"weights file not found: {spec}")
    names = ", ".join(["DEFAULT", *(member.name for member in enum)])
    raise WeightsError(f"unknown weights {spec!r} for {arch}: use one of {names}, or a state_dict file path")


def _load_from_hub(source: TorchvisionSource, weights: WeightsEnum, model_args: dict[str, Any]) -> nn.Module:
    arch = source.arch
    path = hub_cache_file(weights)
    if not path.is_file():
        raise WeightsError(
            f"{weights} is not in the torch hub cache and prunekit never downloads: expected {path} "
            f"(fetch {weights.url} elsewhere and copy it there, or point TORCH_HOME at a cache that has it)"
        )
    # Read it ourselves first, safely: torch.hub loads cache files with weights_only=False.
    state_dict = _read_state_dict(path)
    try:
        # Let torchvision build and load, so its per-architecture quirks (densenet key renames,
        # inception/googlenet auxiliary heads, ViT image sizes) apply exactly as upstream.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = source._get_model(weights, dict(model_args))
    except RuntimeError as err:
        categories = len(weights.meta["categories"])
        reference = source.build(categories)
        problem = mismatch_message(
            f"weights file {path}", f"{arch}(num_classes={categories})", reference, state_dict
        )
        raise WeightsError(problem or f"cannot load {path}: {first_line(err)}") from None
    return model.eval()


def _load_local(
    source: TorchvisionSource, path: Path, num_classes: int | None, model_args: dict[str, Any]
) -> tuple[nn.Module, int]:
    state_dict = _read_state_dict(path)
    if num_classes is None:
        num_classes = _infer_num_classes(source, state_dict) or TORCHVISION_NUM_CLASSES
    model = source.build(num_classes, **model_args)
    problem = mismatch_message(
        f"weights file {path}", f"{source.arch}(num_classes={num_classes})", model, state_dict
    )
    if problem:
        raise WeightsError(problem)
    model.load_state_dict(state_dict)
    return model.eval(), num_classes


def _infer_num_classes(source: TorchvisionSource, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The head size stored in the file, so a 10-class state_dict loads without --num-classes."""
    try:
        with torch.device("meta"):  # no memory, no initialisation cost: we only need module names
            skeleton = source.build()
    except NotImplementedError:  # regnets compute widths from tensor data, which meta tensors lack
        skeleton = source.build()
    if not _has_linear(skeleton):
        return None
    name, _ = last_linear(skeleton)
    weight = state_dict.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict with weights_only=True; unwrap {"state_dict": ...} / {"model": ...}; strip
    DataParallel / torch.compile key prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise WeightsError(
                f"cannot read weights file {path}: it holds more than tensors (a pickled model?); "
                "save model.state_dict() instead"
            ) from None
        raise WeightsError(f"cannot read weights file {path}: {first_line(err)}") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError... for a damaged file
        raise WeightsError(
            f"cannot read weights file {path}: not a PyTorch file or truncated ({first_line(err)})"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def mismatch_message(
    what: str, built: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> str | None:
    """One line naming missing / unexpected keys and disagreeing shapes, or None if `state_dict` fits.
    The one wording for "these weights do not fit", for weights files and checkpoints alike."""
    expected = model.state_dict()
    shapes = [
        f"{k}: file {list(state_dict[k].shape)}, model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    # BatchNorm tolerates a missing num_batches_tracked, like load_state_dict(strict=True) does.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if not (shapes or missing or unexpected):
        return None
    parts = [
        _listing(f"{len(missing)} missing key(s)", missing),
        _listing(f"{len(unexpected)} unexpected key(s)", unexpected),
        _listing(f"{len(shapes)} shape mismatch(es)", shapes),
    ]
    return f"{what} does not fit {built}: " + "; ".join(p for p in parts if p)


def _listing(label: str, items: list[str], first: int = 3) -> str:
    if not items:
        return ""
    more = f", ... {len(items) - first} more" if len(items) > first else ""
    return f"{label} ({', '.join(items[:first])}{more})"
