"""Model sources beyond torchvision: `package.module:factory`, `path/to/file.py:factory`, `timm:NAME`.

A source builds an `nn.Module` (keyword arguments from `--model-arg` / `[model.args]` reach the
factory) and loads weights from a state_dict file. `prunekit.models.resolve_source` picks the source
kind from the string; this module holds the kinds that are not torchvision.

Trust: a `module:factory` or `file.py:factory` source runs the user's code when it is imported, so
prunekit imports one only when the user names it (the command line, a config, a Python call). A
checkpoint records its source, but loading it never imports that source on the checkpoint's word alone
(`prunekit.checkpoint.load_checkpoint(path, source=...)`). timm models are built from timm's own
registry, like torchvision's, and are loaded by name.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.config import ModelSpec
from prunekit.errors import ConfigError, UnknownModelError, WeightsError, first_line

TIMM_PREFIX = "timm:"
# the one copy of ImageNet's statistics (prunekit.models re-exports them)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def is_code_source(source: str | None) -> bool:
    """Whether `source` names Python code to import (`module:factory` or `file.py:factory`)."""
    return source is not None and ":" in source and not source.startswith(TIMM_PREFIX)


def same_source(a: str, b: str) -> bool:
    """The same source, also when a file is named by another relative path to the same file."""
    if a == b:
        return True
    (pa, _, fa), (pb, _, fb) = a.rpartition(":"), b.rpartition(":")
    if fa != fb or not (pa.endswith(".py") and pb.endswith(".py")):
        return False
    return Path(pa).expanduser().resolve() == Path(pb).expanduser().resolve()


def _check_module(model: Any, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _load_weights(model: nn.Module, path_text: str, built: str) -> None:
    from prunekit.models import _read_state_dict, mismatch_message

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path_text} (a model of your own takes a state_dict file)"
        )
    state_dict = _read_state_dict(path)
    problem = mismatch_message(f"weights file {path}", built, model, state_dict)
    if problem:
        raise WeightsError(problem)
    model.load_state_dict(state_dict)


def _num_classes(model: nn.Module, spec: ModelSpec) -> int:
    from prunekit.models import check_runs

    out = check_runs(model, spec)  # a wrong input shape is a one-line error, not the model's traceback
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"{spec.name} must return logits of shape (batch, classes)")
    return int(out.shape[1])


def complete_spec(model: nn.Module, spec: ModelSpec) -> ModelSpec:
    """`spec` with what a model of one's own leaves open filled in: the normalisation (ImageNet's for
    RGB, 0.5 for other channel counts) and the class count (read from the model's output)."""
    if spec.input_shape is None:
        raise ConfigError(f"the input shape of {spec.name} is unknown: give --input-shape C,H,W")
    channels = spec.input_shape[0]
    full = spec.with_defaults(
        mean=IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
        std=IMAGENET_STD if channels == 3 else (0.5,) * channels,
    )
    return full if full.num_classes is not None else full.with_defaults(num_classes=_num_classes(model, full))


class FactorySource:
    """`package.module:factory` or `path/to/file.py:factory`: a callable returning an nn.Module."""

    def __init__(self, source: str) -> None:
        target, _, factory = source.rpartition(":")
        if not target or not factory.isidentifier():
            raise ConfigError(f"model source {source!r} must be package.module:factory or file.py:factory")
        self.source, self.target, self.factory_name = source, target, factory
        self.kind = "file" if target.endswith(".py") else "module"

    def _module(self) -> Any:
        if self.kind == "module":
            try:
                return importlib.import_module(self.target)
            except ModuleNotFoundError as exc:
                raise UnknownModelError(
                    f"cannot import {self.target} for {self.source}: {first_line(exc)}"
                ) from None
            except Exception as exc:  # the user's module failed while importing: say how, in one line
                raise ConfigError(
                    f"importing {self.target} failed: {type(exc).__name__}: {first_line(exc)}"
                ) from None
        path = Path(self.target).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"model file not found: {self.target}")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        name = f"prunekit_user_model_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UnknownModelError(f"cannot import {self.target} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(
                f"importing {self.target} failed: {type(exc).__name__}: {first_line(exc)}"
            ) from None
        return module

    def factory(self) -> Callable[..., Any]:
        module = self._module()
        fn = getattr(module, self.factory_name, None)
        if fn is None:
            names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            close = difflib.get_close_matches(self.factory_name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(f"{self.target} has no {self.factory_name!r}{hint}")
        if not callable(fn):
            raise ConfigError(f"{self.source} is a {type(fn).__name__}, not a function that builds a model")
        return fn

    def build(self, num_classes: int | None = None, **model_args: Any) -> nn.Module:
        fn = self.factory()
        kwargs = dict(model_args)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            inspect.signature(fn).bind(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.source} does not take {sorted(kwargs)}: {first_line(exc)}") from None
        try:
            model = fn(**kwargs)
        except Exception as exc:  # the user's factory failed: one line, not their traceback
            raise ConfigError(f"{self.source}() failed: {type(exc).__name__}: {first_line(exc)}") from None
        return _check_module(model, f"{self.source}()")

    def load(self, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        if spec.input_shape is None:
            raise ConfigError(
                f"{spec.source} is a model of your own: give its input shape (--input-shape C,H,W)"
            )
        model = self.build(spec.num_classes, **spec.model_args)
        if spec.weights is not None:
            _load_weights(model, spec.weights, self.source)
        return model.eval(), complete_spec(model, spec)


class TimmSource:
    """`timm:NAME`: a model from timm's registry (the optional extra `prunekit[timm]`). Weights from a
    state_dict file: prunekit never downloads."""

    kind = "timm"

    def __init__(self, source: str) -> None:
        self.source, self.name = source, source[len(TIMM_PREFIX) :]
        try:
            import timm
        except ImportError:
            raise ConfigError(f"{source} needs timm: pip install 'prunekit[timm]'") from None
        self.timm = timm
        if not timm.is_model(self.name):
            close = difflib.get_close_matches(self.name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(f"timm has no model {self.name!r}{hint}")

    def build(self, num_classes: int | None = None, **model_args: Any) -> nn.Module:
        kwargs = dict(model_args)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            model = self.timm.create_model(self.name, pretrained=False, **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"timm cannot build {self.name}: {type(exc).__name__}: {first_line(exc)}"
            ) from None
        return _check_module(model, self.source)

    def load(self, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        model = self.build(spec.num_classes, **spec.model_args)
        if spec.weights is not None:
            _load_weights(model, spec.weights, self.source)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        shape = tuple(cfg.get("input_size", (3, 224, 224)))
        full = spec.with_defaults(
            input_shape=shape,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
        )
        return model.eval(), full.with_defaults(num_classes=int(getattr(model, "num_classes", 0)) or None)


__all__ = ["TIMM_PREFIX", "FactorySource", "TimmSource", "is_code_source", "same_source"]
