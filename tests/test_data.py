"""Data loaders on tiny ImageFolder trees written into tmp_path, and the built-in Fashion-MNIST subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.data import builtin_loaders, image_folder_loaders, resolve_data, stratified_split
from prunekit.errors import ConfigError, DataError

CLASSES = ("cat", "dog", "emu")
STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
STATS_1 = {"mean": (0.5,), "std": (0.25,)}


def write_images(folder: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 4, size=(40, 30)) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i}.png")


def loaders(root: Path, **kwargs):
    options = {"input_shape": (3, 32, 32), "batch_size": 4, "workers": 0, **STATS, **kwargs}
    return image_folder_loaders(root, **options)


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_train_and_val_folders(tmp_path: Path, val_name: str) -> None:
    write_images(tmp_path / "train", per_class=4)
    write_images(tmp_path / val_name, per_class=2)
    data = loaders(tmp_path)
    assert data.classes == CLASSES and data.num_classes == 3
    assert (len(data.train.dataset), len(data.val.dataset)) == (12, 6)
    images, labels = next(iter(data.train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1, 2}


def test_one_folder_is_split_per_class_and_seeded(tmp_path: Path) -> None:
    write_images(tmp_path, per_class=10)
    data = loaders(tmp_path, val_fraction=0.2, seed=3)
    assert (len(data.train.dataset), len(data.val.dataset)) == (24, 6)
    val_labels = [label for _, label in data.val.dataset]
    assert sorted(val_labels) == [0, 0, 1, 1, 2, 2]
    again = loaders(tmp_path, val_fraction=0.2, seed=3)
    assert again.val.dataset.samples == data.val.dataset.samples
    other = loaders(tmp_path, val_fraction=0.2, seed=4)
    assert other.val.dataset.samples != data.val.dataset.samples
    assert not set(data.train.dataset.samples) & set(data.val.dataset.samples)


def test_small_images_are_decoded_once_and_match_the_per_epoch_pipeline(tmp_path: Path) -> None:
    """Small inputs are decoded into memory once; what a loader then yields equals what the per-image
    transforms give on the files (eval exactly, training with the same random draws)."""
    from prunekit.data import DecodedImages, eval_transform, train_transform

    write_images(tmp_path / "train", per_class=3)
    write_images(tmp_path / "val", per_class=2)
    data = loaders(tmp_path, input_shape=(3, 24, 24))
    assert isinstance(data.train.dataset, DecodedImages) and isinstance(data.val.dataset, DecodedImages)
    assert data.val.dataset.images.dtype == torch.uint8 and data.val.dataset.images.shape[1:] == (3, 24, 24)
    from torchvision.datasets.folder import default_loader

    path, label = data.val.dataset.samples[4]
    expected = eval_transform((3, 24, 24), **STATS)(default_loader(path))
    got, got_label = data.val.dataset[4]
    assert got_label == label and torch.equal(got, expected)
    path, _ = data.train.dataset.samples[2]
    torch.manual_seed(5)
    expected = train_transform((3, 24, 24), **STATS)(default_loader(path))
    torch.manual_seed(5)
    assert torch.equal(data.train.dataset[2][0], expected)
    big = loaders(tmp_path, input_shape=(3, 96, 96))  # large inputs crop the original: not decoded once
    assert not isinstance(big.train.dataset, DecodedImages)


def test_stratified_split_keeps_every_class() -> None:
    labels = [0] * 5 + [1] * 2 + [2]
    train, val = stratified_split(labels, val_fraction=0.1, seed=0)
    assert sorted(train + val) == list(range(8))
    assert {labels[i] for i in val} == {0, 1}  # the one-image class stays in train
    assert {labels[i] for i in train} == {0, 1, 2}


def test_large_inputs_and_grayscale_images(tmp_path: Path) -> None:
    write_images(tmp_path / "train", per_class=2)
    write_images(tmp_path / "val", per_class=1)
    Image.fromarray(np.full((50, 70), 128, dtype=np.uint8), mode="L").save(tmp_path / "val" / "cat" / "g.png")
    data = loaders(tmp_path, input_shape=(3, 96, 96), batch_size=8)
    for loader in (data.train, data.val):
        images, _ = next(iter(loader))
        assert images.shape[1:] == (3, 96, 96)
    gray, _ = data.val.dataset[
        [s for s, _ in data.val.dataset.samples].index(str(tmp_path / "val/cat/g.png"))
    ]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "data folder not found: {root}"),
        ("file", "data path is not a folder: {root}"),
        ("empty", "no class subfolders in {root}"),
        ("no_images", "no images in {root}"),
        ("empty_class", "class folder(s) without images in {root}: emu"),
        (
            "mismatch",
            "class folders of {root}/train and {root}/val differ: only in train ['emu'], only in val []",
        ),
    ],
)
def test_bad_folders(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "empty":
        root.mkdir()
    elif layout == "no_images":
        for c in CLASSES:
            (root / c).mkdir(parents=True)
        (root / "cat" / "notes.txt").write_text("no image here")
    elif layout == "empty_class":
        write_images(root, classes=("cat", "dog"))
        (root / "emu").mkdir()
    elif layout == "mismatch":
        write_images(root / "train")
        write_images(root / "val", classes=("cat", "dog"))
    with pytest.raises(DataError) as info:
        loaders(root)
    assert str(info.value).startswith(message.format(root=root))
    assert "\n" not in str(info.value)


def test_builtin_dataset() -> None:
    data = builtin_loaders(input_shape=(3, 32, 32), batch_size=50, train_augment=False)
    assert data.num_classes == 10 and len(data.classes) == 10 and data.classes[0] == "T-shirt/top"
    assert (len(data.train.dataset), len(data.val.dataset)) == (6000, 1000)
    images, labels = next(iter(data.train))
    assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    assert 0 <= labels.min() and labels.max() <= 9
    # normalised with the subset's own statistics
    val = torch.cat([batch for batch, _ in data.val])
    assert abs(val.mean().item()) < 0.1 and abs(val.std().item() - 1) < 0.1
    assert torch.equal(val[:, 0], val[:, 2])  # gray in every channel


def test_resolve_data_dispatches(tmp_path: Path) -> None:
    images, _ = next(iter(resolve_data("builtin", input_shape=(3, 28, 28), batch_size=8).val))
    assert images.shape == (8, 3, 28, 28)
    write_images(tmp_path, per_class=3)
    assert resolve_data(str(tmp_path), input_shape=(3, 32, 32), batch_size=8).classes == CLASSES
    with pytest.raises(DataError, match="data folder not found"):
        resolve_data("builtin-typo", input_shape=(3, 32, 32))


def test_grayscale_and_non_square_shapes(tmp_path: Path) -> None:
    write_images(tmp_path, per_class=3)
    data = resolve_data(str(tmp_path), input_shape=(1, 24, 40), batch_size=4, **STATS_1)
    images, _ = next(iter(data.train))
    assert images.shape == (4, 1, 24, 40)
    images, _ = next(iter(builtin_loaders(input_shape=(1, 28, 28), batch_size=4).val))
    assert images.shape == (4, 1, 28, 28)
    with pytest.raises(ConfigError, match="1 .grayscale. or 3 .RGB. channels"):
        builtin_loaders(input_shape=(4, 28, 28))


def test_sampler_slot_orders_the_training_set() -> None:
    from torch.utils.data import SequentialSampler

    data = builtin_loaders(
        input_shape=(3, 28, 28), batch_size=6, train_sampler=SequentialSampler, train_augment=False
    )
    assert isinstance(data.train.sampler, SequentialSampler)
    first, _ = next(iter(data.train))
    again, _ = next(iter(data.train))
    assert torch.equal(first, again)  # no shuffle: the sampler decides the order


@pytest.mark.parametrize(("images", "batch", "batches"), [(7, 3, 2), (6, 5, 1), (5, 64, 1), (8, 3, 3)])
def test_a_last_training_batch_of_one_is_dropped(
    tmp_path: Path, images: int, batch: int, batches: int
) -> None:
    """BatchNorm cannot train on one example: a remainder of exactly one is dropped, nothing else is."""
    data = builtin_loaders(input_shape=(3, 28, 28), batch_size=batch)
    from torch.utils.data import DataLoader, Subset

    from prunekit.data import _loaders

    loaders = _loaders(Subset(data.train.dataset, range(images)), data.val.dataset, ("a",), batch, 0, 0, None)
    sizes = [len(y) for _, y in loaders.train]
    assert len(sizes) == batches and min(sizes) > 1
    assert isinstance(loaders.train, DataLoader)


def test_training_needs_two_images() -> None:
    from torch.utils.data import Subset

    from prunekit.data import _loaders

    data = builtin_loaders(input_shape=(3, 28, 28), batch_size=4)
    with pytest.raises(DataError, match="at least 2 images"):
        _loaders(Subset(data.train.dataset, [0]), data.val.dataset, ("a",), 4, 0, 0, None)
