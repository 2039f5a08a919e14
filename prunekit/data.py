"""Data loaders: ImageFolder trees on disk and the built-in Fashion-MNIST subset. Never downloads."""

from __future__ import annotations

import copy
import importlib.resources
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from prunekit.errors import ConfigError, DataError, first_line

BUILTIN = "builtin"
BUILTIN_INPUT_SHAPE = (3, 32, 32)
BUILTIN_FILE = "fashion_mnist_subset.npz"
SMALL_INPUT = 64  # at or below this side length, augment CIFAR-style (pad + crop) instead of resized crops
_VAL_DIRS = ("val", "test")

Stats = tuple[float, ...]
Shape = tuple[int, int, int]
# The sampler slot: given the training dataset, the sampler that orders it (a DistributedSampler under
# torchrun). None: a seeded shuffle.
SamplerFactory = Callable[[Dataset], Sampler]


@dataclass(frozen=True)
class DataLoaders:
    train: DataLoader
    val: DataLoader
    num_classes: int
    classes: tuple[str, ...]


def resolve_data(
    spec: str,
    *,
    input_shape: Shape,
    mean: Stats | None = None,
    std: Stats | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_augment: bool = True,
    train_sampler: SamplerFactory | None = None,
    val_sampler: SamplerFactory | None = None,
    pin_memory: bool = False,
    strict: bool = False,
) -> DataLoaders:
    """`--data builtin` is the built-in example data; anything else is an ImageFolder root.

    For a folder, `mean`/`std` default to ImageNet's; for the built-in data, to its own statistics.
    `resize_size` and `interpolation` (a ModelSpec's) set how a folder's large images are resized for
    evaluation, and the interpolation of its training crops (see `eval_transform`); the built-in data
    ignores them. Image files that do not decode are skipped with a warning, or are an error with
    `strict` (see `screen_images`).
    """
    if spec == BUILTIN:
        return builtin_loaders(
            input_shape=input_shape,
            mean=mean,
            std=std,
            batch_size=batch_size,
            workers=workers,
            seed=seed,
            train_augment=train_augment,
            train_sampler=train_sampler,
            val_sampler=val_sampler,
            pin_memory=pin_memory,
        )
    from prunekit.models import IMAGENET_MEAN, IMAGENET_STD

    return image_folder_loaders(
        spec,
        input_shape=input_shape,
        mean=mean or IMAGENET_MEAN,
        std=std or IMAGENET_STD,
        resize_size=resize_size,
        interpolation=interpolation,
        batch_size=batch_size,
        workers=workers,
        val_fraction=val_fraction,
        seed=seed,
        train_augment=train_augment,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        pin_memory=pin_memory,
        strict=strict,
    )


def image_folder_loaders(
    root: str | Path,
    *,
    input_shape: Shape,
    mean: Stats,
    std: Stats,
    batch_size: int,
    workers: int,
    resize_size: int | None = None,
    interpolation: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_augment: bool = True,
    train_sampler: SamplerFactory | None = None,
    val_sampler: SamplerFactory | None = None,
    pin_memory: bool = False,
    strict: bool = False,
) -> DataLoaders:
    """Loaders for `root/train` + `root/val` (or `root/test`), or for one ImageFolder `root` split per
    class into train/val by `val_fraction` (seeded). Images are read as RGB (grayscale for 1 channel).
    `resize_size`/`interpolation`: see `eval_transform` and `train_transform`. Files that do not decode
    are skipped with a warning (an error with `strict`): `screen_images`."""
    _check_loader_args(input_shape, batch_size, workers)
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    val_parts = _eval_parts(input_shape, mean, std, resize_size=resize_size, interpolation=interpolation)
    train_parts = (
        _train_parts(input_shape, mean, std, interpolation=interpolation) if train_augment else val_parts
    )
    val_tf = v2.Compose([*val_parts[0], *val_parts[1]])  # as eval_transform / train_transform compose
    train_tf = v2.Compose([*train_parts[0], *train_parts[1]]) if train_augment else val_tf

    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train_set = _image_folder(root / "train", train_tf, strict)
        val_set = _image_folder(val_dir, val_tf, strict)
        if train_set.classes != val_set.classes:
            only_train = sorted(set(train_set.classes) - set(val_set.classes))
            only_val = sorted(set(val_set.classes) - set(train_set.classes))
            raise DataError(
                f"class folders of {root / 'train'} and {val_dir} differ: "
                f"only in train {only_train[:5]}, only in {val_dir.name} {only_val[:5]}"
            )
        classes = tuple(train_set.classes)
        train: Dataset = train_set
        val: Dataset = val_set
    else:
        # One ImageFolder (root itself, or root/train without a val/test sibling): hold out val_fraction.
        folder = root / "train" if (root / "train").is_dir() else root
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        full_train = _image_folder(folder, train_tf, strict)
        full_val = copy.copy(full_train)  # the same screened files, with the evaluation transform
        full_val.transform = val_tf
        train_idx, val_idx = stratified_split(full_train.targets, val_fraction, seed)
        if not val_idx:
            raise DataError(f"too few images in {folder} to hold out a validation split")
        classes = tuple(full_train.classes)
        train, val = SplitSubset(full_train, train_idx), SplitSubset(full_val, val_idx)
    train = _decoded(train, train_parts, input_shape, strict)
    val = _decoded(val, val_parts, input_shape, strict)
    return _loaders(train, val, classes, batch_size, workers, seed, train_sampler, val_sampler, pin_memory)


def builtin_loaders(
    *,
    input_shape: Shape = BUILTIN_INPUT_SHAPE,
    mean: Stats | None = None,
    std: Stats | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    train_augment: bool = True,
    train_sampler: SamplerFactory | None = None,
    val_sampler: SamplerFactory | None = None,
    pin_memory: bool = False,
) -> DataLoaders:
    """The shipped Fashion-MNIST subset (6000 train / 1000 test, 10 classes; see prunekit/_data/README.md):
    grayscale (repeated to 3 channels for an RGB model), resized to `input_shape`, normalised with the
    subset's own statistics unless `mean`/`std` are given. Its test split is the validation split."""
    _check_loader_args(input_shape, batch_size, workers)
    arrays = _builtin_arrays()
    own_mean = (float(arrays["mean"]),) * input_shape[0]
    own_std = (float(arrays["std"]),) * input_shape[0]
    mean, std = mean or own_mean, std or own_std
    val_tf = eval_transform(input_shape, mean, std)
    train_tf = train_transform(input_shape, mean, std) if train_augment else val_tf
    train = ArrayImages(arrays["train_images"], arrays["train_labels"], train_tf)
    val = ArrayImages(arrays["test_images"], arrays["test_labels"], val_tf)
    classes = tuple(str(c) for c in arrays["classes"])
    return _loaders(train, val, classes, batch_size, workers, seed, train_sampler, val_sampler, pin_memory)


class ArrayImages(Dataset):
    """uint8 grayscale images [N, H, W] with labels, served as 3-channel tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)  # [N, 1, H, W] uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].expand(3, -1, -1)  # [3, H, W] uint8, gray in every channel
        return self.transform(image), int(self.labels[index])


def _size(input_shape: Shape) -> int | tuple[int, int]:
    # a square shape resizes the shorter side (torchvision's convention), keeping the aspect ratio
    _, h, w = input_shape
    return h if h == w else (h, w)


def train_transform(
    input_shape: Shape, mean: Stats, std: Stats, *, interpolation: str | None = None
) -> v2.Compose:
    """Random resized crops for large inputs (resized with `interpolation`, default bilinear);
    pad-and-crop for small (CIFAR-sized) ones; both flip."""
    decode, random = _train_parts(input_shape, mean, std, interpolation=interpolation)
    return v2.Compose([*decode, *random])


def eval_transform(
    input_shape: Shape,
    mean: Stats,
    std: Stats,
    *,
    resize_size: int | None = None,
    interpolation: str | None = None,
) -> v2.Compose:
    """Large inputs: the shorter side resized to `resize_size` with `interpolation`, then a centre crop,
    in that order on the decoded image: exactly what torchvision's preset (`weights.transforms()`) does.
    Without `resize_size`: resized to 256/224 of the crop (ImageNet practice; with `interpolation`,
    default bilinear) and centre-cropped. Small inputs (at most SMALL_INPUT pixels): resized only."""
    decode, rest = _eval_parts(input_shape, mean, std, resize_size=resize_size, interpolation=interpolation)
    return v2.Compose([*decode, *rest])


def _mode(interpolation: str | None) -> v2.InterpolationMode:
    """The InterpolationMode of a ModelSpec's `interpolation` name (None: bilinear, torchvision's default)."""
    if interpolation is None:
        return v2.InterpolationMode.BILINEAR
    try:
        return v2.InterpolationMode(interpolation)
    except ValueError:
        names = ", ".join(m.value for m in v2.InterpolationMode)
        raise ConfigError(f"interpolation must be one of {names}, got {interpolation!r}") from None


def _train_parts(
    input_shape: Shape, mean: Stats, std: Stats, *, interpolation: str | None = None
) -> tuple[list[Any], list[Any]]:
    """(the deterministic steps a decoded image goes through first, the random rest)."""
    _, h, w = input_shape
    if max(h, w) <= SMALL_INPUT:
        decode = [v2.ToImage(), v2.Resize(_size(input_shape), antialias=True)]
        random = [v2.RandomCrop((h, w), padding=h // 8)]
    else:
        crop = v2.RandomResizedCrop((h, w), interpolation=_mode(interpolation), antialias=True)
        decode, random = [v2.ToImage()], [crop]
    return decode, [*random, v2.RandomHorizontalFlip(), *_to_normalised(input_shape, mean, std)]


def _eval_parts(
    input_shape: Shape,
    mean: Stats,
    std: Stats,
    *,
    resize_size: int | None = None,
    interpolation: str | None = None,
) -> tuple[list[Any], list[Any]]:
    _, h, w = input_shape
    mode = _mode(interpolation)
    if max(h, w) <= SMALL_INPUT:
        decode = [v2.ToImage(), v2.Resize(_size(input_shape), antialias=True), v2.CenterCrop((h, w))]
    elif resize_size is not None:
        if resize_size < max(h, w):
            raise ConfigError(f"resize_size {resize_size} is smaller than the {h}x{w} crop")
        # torchvision's preset: resized and cropped as decoded (a PIL image, resized by PIL), then a tensor
        resize = v2.Resize(resize_size, interpolation=mode, antialias=True)
        decode = [resize, v2.CenterCrop((h, w)), v2.ToImage()]
    else:
        size = int(h * 256 / 224) if h == w else (int(h * 256 / 224), int(w * 256 / 224))
        decode = [v2.ToImage(), v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop((h, w))]
    return decode, _to_normalised(input_shape, mean, std)


# Decode an image folder into memory once, instead of every epoch, when its images are small (the
# deterministic decode steps make them the input size) and all of them fit in this many bytes.
DECODE_LIMIT_BYTES = 2 * 2**30


class DecodedImages(Dataset):
    """An image folder decoded once into one uint8 tensor (N, C, H, W); each item then only goes
    through the random (augmentation) and normalising steps, on tensors."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        decode: Any,
        rest: Any,
        threads: int = 4,
        strict: bool = False,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def load(path: str) -> torch.Tensor | str:
            try:
                return decode(datasets.folder.default_loader(path)).as_subclass(torch.Tensor)
            except UNREADABLE as exc:  # passed the header check, fails in the full decode (truncated)
                return first_line(exc)

        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes outside the GIL
            loaded = list(pool.map(load, [p for p, _ in samples], chunksize=256))
        failed = [(p, r) for (p, _), r in zip(samples, loaded, strict=True) if isinstance(r, str)]
        if failed:
            _unreadable(failed, strict, "")
            before = {label for _, label in samples}
            samples = [s for s, r in zip(samples, loaded, strict=True) if not isinstance(r, str)]
            loaded = [r for r in loaded if not isinstance(r, str)]
            lost = sorted(before - {label for _, label in samples})
            if lost:  # every image of a class was unreadable: training would silently miss it
                raise DataError(f"class(es) {lost[:5]} have no image that decodes (see the warning above)")
        images: list[torch.Tensor] = loaded  # type: ignore[assignment]
        if len({tuple(t.shape) for t in images}) > 1:  # other aspect ratios: no single tensor
            raise _Ragged()
        self.samples = list(samples)  # (path, label), as ImageFolder.samples
        self.images = torch.stack(images)
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.rest = rest

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.rest(v2.functional.to_image(self.images[index])), int(self.labels[index])


class _Ragged(Exception):
    """The decoded images do not all have one shape (the training decode keeps the aspect ratio)."""


def _decoded(
    dataset: Dataset, parts: tuple[list[Any], list[Any]], input_shape: Shape, strict: bool = False
) -> Dataset:
    """`dataset` (an ImageFolder or a Subset of one) decoded into memory when small enough; else as is."""
    _, h, w = input_shape
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    samples = base.samples if indices is None else [base.samples[i] for i in indices]  # type: ignore[attr-defined]
    if max(h, w) > SMALL_INPUT or len(samples) * 3 * h * w > DECODE_LIMIT_BYTES:
        return dataset
    decode, rest = parts
    try:
        return DecodedImages(samples, v2.Compose(decode), v2.Compose(rest), strict=strict)
    except _Ragged:
        return dataset  # decoded every epoch, as the per-image pipeline always does


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class seeded split: round(n * val_fraction) of each class (at least 1 when n >= 2) to val."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(targets))
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val_idx += members[:n_val]
        train_idx += members[n_val:]
    return sorted(train_idx), sorted(val_idx)


# -- images that do not decode ----------------------------------------------------------------------
#
# Policy: one pass before any training opens every image file of the folders (its header; with
# `strict`, a full decode). Files that are missing (a broken link), empty, unreadable or not images are
# listed: by default they are skipped with a warning that gives their count and the first few paths;
# with `strict` (--strict-data) they are an error. A file that passes the header check but fails to
# decode later (a truncated JPEG) is replaced by the next image of its split, with a warning, or with
# `strict` (whose pass decodes fully) cannot occur. Either way no epoch ever stops on a bad file.

# what PIL and the file system raise for a file that is not a readable image
UNREADABLE: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)
_SHOWN = 3  # paths named in a warning or error


def screen_images(
    paths: Sequence[str], *, full_decode: bool = False, threads: int = 8
) -> list[tuple[str, str]]:
    """(path, reason) for each file of `paths` that is missing, empty or does not open as an image
    (its header; with `full_decode`, its pixels too)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(path: str) -> str | None:
        try:
            if os.stat(path).st_size == 0:
                return "empty file"
            with Image.open(path) as image:
                if full_decode:
                    image.load()
        except FileNotFoundError:
            return "missing (a broken link?)"
        except UNREADABLE as exc:
            return first_line(exc)
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O and PIL's decoders release the GIL
        reasons = list(pool.map(check, paths, chunksize=256))
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def _unreadable(bad: Sequence[tuple[str, str]], strict: bool, where: str) -> None:
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    if strict:
        raise DataError(
            f"{len(bad)} image file(s){where} do not decode: {shown}{more} (drop --strict-data to skip them)"
        )
    warn(f"skipped {len(bad)} image file(s){where} that do not decode: {shown}{more}")


def warn(message: str) -> None:
    """A warning on stderr, from the primary process only (under torchrun every process loads data)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


class TolerantImageFolder(datasets.ImageFolder):
    """An ImageFolder whose items never stop an epoch: an image that fails to decode (after passing
    the screening) is replaced by the next one of the split, with a warning (an error with `strict`)."""

    def __init__(self, *args: Any, strict: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strict = strict

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.tolerant_item(range(len(self.samples)), index)

    def tolerant_item(self, split: Sequence[int], position: int) -> tuple[Any, int]:
        """Item `split[position]`, or the next one of `split` that decodes."""
        for attempt in range(len(split)):
            i = split[(position + attempt) % len(split)]
            try:
                return super().__getitem__(i)
            except UNREADABLE as exc:
                path = self.samples[i][0]
                if self.strict:
                    raise DataError(f"{path} does not decode ({first_line(exc)})") from None
                warn(f"skipped {path}: it does not decode ({first_line(exc)}); the next image stands in")
        raise DataError(f"no image of {self.root} decodes")


class SplitSubset(Subset):
    """A split (train or val) of one TolerantImageFolder: a stand-in for an image that does not decode
    comes from the same split, never from the other one."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset.tolerant_item(self.indices, index)  # type: ignore[attr-defined]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:  # what DataLoader batches call
        return [self[i] for i in indices]


# -- internals ---------------------------------------------------------------------------------------------


def _to_normalised(input_shape: Shape, mean: Stats, std: Stats) -> list[Any]:
    channels = [v2.Grayscale(1)] if input_shape[0] == 1 else []
    return [*channels, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _image_folder(root: Path, transform: Any, strict: bool = False) -> datasets.ImageFolder:
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"no class subfolders in {root}: expected {root}/<class>/<image files>")
    try:
        # allow_empty so we can name the empty classes ourselves instead of torchvision's long message.
        dataset = TolerantImageFolder(root, transform=transform, allow_empty=True, strict=strict)
    except (FileNotFoundError, PermissionError) as err:
        raise DataError(f"cannot read {root} as an image folder: {err}") from None
    bad = screen_images([p for p, _ in dataset.samples], full_decode=strict)
    if bad:
        _unreadable(bad, strict, f" in {root}")
        drop = {p for p, _ in bad}
        dataset.samples = [s for s in dataset.samples if s[0] not in drop]
        dataset.imgs = dataset.samples
        dataset.targets = [t for _, t in dataset.samples]
    if not dataset.samples:
        extensions = ", ".join(datasets.folder.IMG_EXTENSIONS[:4])
        raise DataError(f"no images in {root} (looked for {extensions}, ...)")
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    empty = [c for c, n in zip(dataset.classes, counts, strict=True) if n == 0]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:5])}")
    return dataset


def _loaders(
    train: Dataset,
    val: Dataset,
    classes: tuple[str, ...],
    batch_size: int,
    workers: int,
    seed: int,
    train_sampler: SamplerFactory | None,
    val_sampler: SamplerFactory | None = None,
    pin_memory: bool = False,
) -> DataLoaders:
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": workers}
    # the training loader's workers start afresh every epoch: their seeds then come from the loader's
    # generator at each epoch start, which a resumed run restores, so resuming is exact with workers too
    # (persistent workers would draw their seeds once per loader and carry RNG state across epochs)
    val_extra: dict[str, Any] = {"persistent_workers": True} if workers > 0 else {}
    # the generator is kept even with a sampler: resume saves and restores its state
    order: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)}
    if train_sampler is None:
        order["shuffle"] = True
    else:
        order["sampler"] = train_sampler(train)
    per_epoch = len(order["sampler"]) if "sampler" in order else len(train)  # type: ignore[arg-type]
    if per_epoch < 2:
        raise DataError(f"training needs at least 2 images (per process), got {per_epoch}")
    # a last batch of one example would stop BatchNorm in training ("Expected more than 1 value per
    # channel"): drop it, and only it (other last batches are kept)
    order["drop_last"] = per_epoch % batch_size == 1
    return DataLoaders(
        train=DataLoader(train, **order, **common),
        val=DataLoader(
            val,
            shuffle=False,
            sampler=None if val_sampler is None else val_sampler(val),
            **common,
            **val_extra,
        ),
        num_classes=len(classes),
        classes=classes,
    )


def _builtin_arrays() -> dict[str, np.ndarray]:
    resource = importlib.resources.files("prunekit") / "_data" / BUILTIN_FILE
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataError(f"the built-in dataset {BUILTIN_FILE} is missing from the installation") from None


def _check_loader_args(input_shape: Shape, batch_size: int, workers: int) -> None:
    c, h, w = input_shape
    if min(h, w) < 8:
        raise ConfigError(f"input size must be at least 8 pixels, got {h}x{w}")
    if c not in (1, 3):
        raise ConfigError(f"image data gives 1 (grayscale) or 3 (RGB) channels; the model takes {c}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be 0 or more, got {workers}")
