"""Evaluation preprocessing as torchvision's weights do it: the ModelSpec prunekit derives for torchvision
weights (resize, crop, interpolation, normalisation) and the eval transform built from it equal
`weights.transforms()`, parameter by parameter and pixel by pixel. No download: a preset is metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torchvision.transforms import v2

from prunekit.config import ModelSpec, parse_run_config
from prunekit.data import eval_transform, resolve_data, train_transform
from prunekit.errors import ConfigError
from prunekit.models import TorchvisionSource, load_model, weights_preprocessing

WEIGHTS = [
    ("resnet50", tvm.ResNet50_Weights.IMAGENET1K_V1),  # 256 / 224, bilinear
    ("resnet50", tvm.ResNet50_Weights.IMAGENET1K_V2),  # 232 / 224, bilinear
    ("efficientnet_b0", tvm.EfficientNet_B0_Weights.IMAGENET1K_V1),  # 256 / 224, bicubic
    ("vit_b_16", tvm.ViT_B_16_Weights.IMAGENET1K_V1),  # 256 / 224, bilinear
]
IDS = [f"{arch}-{weights.name}" for arch, weights in WEIGHTS]
# (width, height): portrait and landscape, neither of them square nor of the crop's size
IMAGE_SIZES = [(300, 400), (400, 300)]


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def derived_spec(arch: str, weights: tvm.WeightsEnum, **fields) -> ModelSpec:
    """The spec the loader fills in for these weights (the same code, without reading the weights)."""
    return TorchvisionSource(arch).complete(ModelSpec(arch, weights=weights.name, **fields), weights, 1000)


def spec_eval_transform(spec: ModelSpec) -> v2.Compose:
    return eval_transform(
        spec.input_shape,
        spec.mean,
        spec.std,
        resize_size=spec.resize_size,
        interpolation=spec.interpolation,
    )


def only(transform: v2.Compose, kind: type) -> v2.Transform:
    found = [t for t in transform.transforms if isinstance(t, kind)]
    assert len(found) == 1, transform
    return found[0]


@pytest.mark.parametrize(("arch", "weights"), WEIGHTS, ids=IDS)
def test_spec_records_the_weights_preset(arch: str, weights: tvm.WeightsEnum) -> None:
    preset = weights.transforms()
    spec = derived_spec(arch, weights)
    crop = preset.crop_size[0]
    assert spec.input_shape == (3, crop, crop)
    assert [spec.resize_size] == preset.resize_size
    assert spec.interpolation == preset.interpolation.value
    assert spec.mean == tuple(preset.mean) and spec.std == tuple(preset.std)
    # the spec survives a checkpoint's round trip
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("arch", "weights"), WEIGHTS, ids=IDS)
def test_eval_transform_has_the_presets_parameters(arch: str, weights: tvm.WeightsEnum) -> None:
    preset = weights.transforms()
    transform = spec_eval_transform(derived_spec(arch, weights))
    resize = only(transform, v2.Resize)
    assert resize.size == preset.resize_size
    assert resize.interpolation == preset.interpolation
    assert resize.antialias == preset.antialias is True
    assert list(only(transform, v2.CenterCrop).size) == preset.crop_size * 2
    normalize = only(transform, v2.Normalize)
    assert normalize.mean == preset.mean and normalize.std == preset.std


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=["portrait", "landscape"])
@pytest.mark.parametrize(("arch", "weights"), WEIGHTS, ids=IDS)
def test_eval_transform_output_equals_the_presets(
    arch: str, weights: tvm.WeightsEnum, size: tuple[int, int]
) -> None:
    image = random_image(size)
    expected = weights.transforms()(image)
    got = spec_eval_transform(derived_spec(arch, weights))(image)
    assert got.shape == expected.shape == (3, 224, 224)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=0, atol=1e-6)


def test_the_old_default_differs_from_a_preset_where_it_should() -> None:
    """Guards the test above: the default rule (256/224, bilinear) does not pass for weights whose preset
    is 232 px (ResNet50 V2) or bicubic (EfficientNet-B0)."""
    image = random_image(IMAGE_SIZES[0])
    for arch, weights in WEIGHTS[1:3]:
        spec = derived_spec(arch, weights)
        default = eval_transform(spec.input_shape, spec.mean, spec.std)(image)
        assert (default - weights.transforms()(image)).abs().max() > 1e-2, weights


@pytest.mark.parametrize(("arch", "weights"), WEIGHTS, ids=IDS)
def test_the_loader_fills_the_preset_in(
    monkeypatch: pytest.MonkeyPatch, arch: str, weights: tvm.WeightsEnum
) -> None:
    """load_model itself records the preset (its weights file is faked: nothing is downloaded or read)."""
    import prunekit.models

    def fake_hub(source: TorchvisionSource, w: tvm.WeightsEnum, model_args: dict) -> torch.nn.Module:
        assert w is weights
        with torch.device("meta"):  # no memory, no initialisation cost
            return source.build(len(w.meta["categories"]), **model_args)

    monkeypatch.setattr(prunekit.models, "_load_from_hub", fake_hub)
    _, spec = load_model(ModelSpec(arch, weights=weights.name))
    preset = weights.transforms()
    assert spec == derived_spec(arch, weights)
    assert (spec.resize_size, spec.interpolation) == (preset.resize_size[0], preset.interpolation.value)
    _, spec10 = load_model(ModelSpec(arch, weights=weights.name, num_classes=10))  # a new head
    assert spec10.num_classes == 10 and spec10.resize_size == spec.resize_size


def test_without_torchvision_weights_the_default_applies() -> None:
    spec = TorchvisionSource("resnet50").complete(ModelSpec("resnet50"), None, 1000)
    assert (spec.resize_size, spec.interpolation) == (None, None)
    _, built = load_model(ModelSpec("resnet18", input_shape=32))  # random weights: nothing recorded
    assert (built.resize_size, built.interpolation) == (None, None)


def test_another_input_size_keeps_the_presets_ratio() -> None:
    weights = tvm.ResNet50_Weights.IMAGENET1K_V2
    spec = derived_spec("resnet50", weights, input_shape=320)
    assert spec.input_shape == (3, 320, 320) and spec.resize_size == round(320 * 232 / 224) == 331
    assert spec.interpolation == "bilinear"
    wide = derived_spec("resnet50", weights, input_shape=(3, 224, 320))  # not square: the default rule
    assert wide.resize_size is None and wide.interpolation == "bilinear"
    assert spec_eval_transform(wide)(random_image((400, 300))).shape == (3, 224, 320)
    assert spec.with_input_shape(224).resize_size == 232
    own = derived_spec("resnet50", weights, resize_size=240)  # a value given is kept
    assert own.resize_size == 240


def test_old_spec_dict_loads_with_the_old_behaviour() -> None:
    """A spec written before resize_size / interpolation existed (a checkpoint's "model") loads with both
    None, and evaluates as prunekit always did: resized to 256/224 of the crop, bilinear, on tensors."""
    old = {
        "source": "resnet50",
        "weights": "IMAGENET1K_V2",
        "num_classes": 1000,
        "input_shape": [3, 224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "model_args": {},
    }
    spec = ModelSpec.from_dict(old)
    assert (spec.resize_size, spec.interpolation) == (None, None)
    assert spec.to_dict() == old | {"resize_size": None, "interpolation": None}
    image = random_image(IMAGE_SIZES[0])
    before = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(256, antialias=True),
            v2.CenterCrop((224, 224)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )
    assert torch.equal(spec_eval_transform(spec)(image), before(image))
    resize = only(spec_eval_transform(spec), v2.Resize)
    assert resize.size == [256] and resize.interpolation == v2.InterpolationMode.BILINEAR


def test_train_crops_use_the_interpolation() -> None:
    bicubic = only(
        train_transform((3, 96, 96), (0.5,) * 3, (0.2,) * 3, interpolation="bicubic"), v2.RandomResizedCrop
    )
    assert bicubic.interpolation == v2.InterpolationMode.BICUBIC
    default = only(train_transform((3, 96, 96), (0.5,) * 3, (0.2,) * 3), v2.RandomResizedCrop)
    assert default.interpolation == v2.InterpolationMode.BILINEAR


def test_small_inputs_keep_their_transform() -> None:
    """At SMALL_INPUT pixels or fewer the preprocessing fields change nothing (CIFAR-style inputs)."""
    image = random_image((40, 30))
    stats = ((0.5,) * 3, (0.25,) * 3)
    given = eval_transform((3, 32, 32), *stats, resize_size=40, interpolation="bicubic")
    assert torch.equal(given(image), eval_transform((3, 32, 32), *stats)(image))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"resize_size": 0}, ["resize_size", "0"]),
        ({"resize_size": True}, ["resize_size", "True"]),
        ({"resize_size": "232"}, ["resize_size", "'232'"]),
        ({"resize_size": 200, "input_shape": 224}, ["resize_size 200", "224x224"]),
        ({"interpolation": "cubic"}, ["interpolation", "'cubic'", "bicubic"]),
        ({"interpolation": 3}, ["interpolation", "3"]),
    ],
)
def test_bad_preprocessing_fields_are_one_line_errors(fields: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        ModelSpec("resnet50", **fields)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_run_config_takes_the_fields() -> None:
    config = parse_run_config(
        {
            "model": {"arch": "resnet50", "resize_size": 256, "interpolation": "bicubic"},
            "finetune": {"data": "builtin", "target_macs": 0.5},
        }
    )
    assert (config.model.resize_size, config.model.interpolation) == (256, "bicubic")
    model = config.to_dict()["model"]
    assert (model["resize_size"], model["interpolation"]) == (256, "bicubic")


def test_an_image_folder_is_evaluated_with_the_preset(tmp_path: Path) -> None:
    """From the spec through the fine-tune stage's loaders to the images: the validation split yields
    exactly what the weights' preset gives for each file."""
    from prunekit.config import FinetuneConfig
    from prunekit.runtime import resolve_runtime
    from prunekit.stages.finetune import data_loaders

    for split, n in (("train", 2), ("val", 1)):
        for c, name in enumerate(("a", "b")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                size = IMAGE_SIZES[(c + i) % 2]
                random_image(size, seed=10 * c + i).save(tmp_path / split / name / f"{i}.png")
    weights = tvm.EfficientNet_B0_Weights.IMAGENET1K_V1
    spec = TorchvisionSource("efficientnet_b0").complete(
        ModelSpec("efficientnet_b0", weights=weights.name, num_classes=2), weights, 2
    )
    config = FinetuneConfig(target_macs=0.5, batch_size=2, workers=0)
    loaders = data_loaders(str(tmp_path), spec, config, resolve_runtime("cpu"))
    preset = weights.transforms()
    dataset = loaders.val.dataset
    for index, (path, label) in enumerate(dataset.samples):
        image, got_label = dataset[index]
        assert got_label == label
        expected = preset(Image.open(path).convert("RGB"))
        torch.testing.assert_close(image.as_subclass(torch.Tensor), expected, rtol=0, atol=1e-6)
    # resolve_data ignores the fields for the built-in data (its images keep their transform)
    builtin = resolve_data("builtin", input_shape=(3, 96, 96), resize_size=300, interpolation="bicubic")
    plain = resolve_data("builtin", input_shape=(3, 96, 96))
    assert torch.equal(builtin.val.dataset[0][0], plain.val.dataset[0][0])


def test_weights_preprocessing_reads_the_preset_only() -> None:
    fields = weights_preprocessing(tvm.Inception_V3_Weights.IMAGENET1K_V1)
    assert fields["input_shape"] == (3, 299, 299) and fields["resize_size"] == 342
    assert fields["interpolation"] == "bilinear"
