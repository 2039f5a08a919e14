"""Model loading: torchvision weights from a (temporary) hub cache, local state_dict files, head resizing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from prunekit.config import ModelSpec
from prunekit.errors import UnknownModelError, WeightsError
from prunekit.models import (
    IMAGENET_MEAN,
    build_model,
    default_input_size,
    hub_cache_file,
    load_model,
    resolve_source,
)

R18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME. torch.hub.get_dir() reads the variable at call time unless set_dir was used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert Path(torch.hub.get_dir()) == tmp_path / "hub", "torch.hub.set_dir was called; TORCH_HOME ignored"
    return tmp_path


@pytest.fixture
def cached_r18(torch_home: Path) -> dict[str, torch.Tensor]:
    """A random resnet18 state_dict placed where torchvision expects ResNet18_Weights.IMAGENET1K_V1."""
    torch.manual_seed(1)
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state_dict, path)
    return state_dict


def assert_same_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], skip: str = "\0") -> None:
    loaded = model.state_dict()
    compared = [k for k in state_dict if not k.startswith(skip)]
    assert compared
    for key in compared:
        assert torch.equal(loaded[key], state_dict[key]), key


def test_hub_cache_file_follows_torch_home(torch_home: Path) -> None:
    assert hub_cache_file(R18_V1) == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_load_from_hub_cache(cached_r18: dict[str, torch.Tensor], name: str) -> None:
    model, spec = load_model("resnet18", weights=name)
    assert_same_weights(model, cached_r18)
    assert not model.training
    assert (spec.source, spec.weights, spec.num_classes) == ("resnet18", name, 1000)
    assert spec.input_shape == (3, 224, 224)
    assert spec.mean == IMAGENET_MEAN


def test_num_classes_with_torchvision_weights_replaces_the_head(cached_r18: dict[str, torch.Tensor]) -> None:
    model, spec = load_model("resnet18", weights="IMAGENET1K_V1", num_classes=10)
    assert spec.num_classes == 10
    assert model.fc.out_features == 10
    assert model.fc.in_features == 512
    assert_same_weights(model, cached_r18, skip="fc.")
    assert model(replace(spec, input_shape=(3, 64, 64)).example_input(2)).shape == (2, 10)


def test_missing_hub_file_names_the_expected_file(torch_home: Path) -> None:
    with pytest.raises(WeightsError) as info:
        load_model("resnet18", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "never downloads" in message and "\n" not in message


def test_weights_of_another_architecture_are_refused(torch_home: Path) -> None:
    with pytest.raises(WeightsError, match="another architecture; resnet18 takes ResNet18_Weights"):
        load_model("resnet18", weights="ResNet50_Weights.IMAGENET1K_V2")


def test_unknown_weights_name_lists_the_choices() -> None:
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K' for resnet18: .*IMAGENET1K_V1"):
        load_model("resnet18", weights="IMAGENET9K")


def test_local_file_with_module_prefix_and_wrapper(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state_dict = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, path)
    model, spec = load_model("resnet18", weights=str(path))  # num_classes inferred from the file's head
    assert spec.num_classes == 10
    assert_same_weights(model, state_dict)


def test_local_file_with_explicit_num_classes(tmp_path: Path) -> None:
    state_dict = torchvision.models.mobilenet_v2(weights=None, num_classes=7).state_dict()
    path = tmp_path / "mnv2.pt"
    torch.save(state_dict, path)
    model, spec = load_model("mobilenet_v2", weights=str(path), num_classes=7)
    assert model.classifier[1].out_features == 7
    assert_same_weights(model, state_dict)


def test_mismatched_state_dict_is_summarised_on_one_line(tmp_path: Path) -> None:
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    del state_dict["layer1.0.conv1.weight"]
    state_dict["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsError) as info:
        load_model("resnet18", weights=str(path), num_classes=5)
    message = str(info.value)
    assert "\n" not in message
    assert "does not fit resnet18(num_classes=5)" in message
    assert "1 missing key(s) (layer1.0.conv1.weight)" in message
    assert "1 unexpected key(s) (extra.weight)" in message
    assert "fc.weight: file [1000, 512], model [5, 512]" in message


def test_pickled_module_is_refused_safely(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(build_model("resnet18"), path)
    with pytest.raises(WeightsError, match="holds more than tensors .*save model.state_dict"):
        load_model("resnet18", weights=str(path))


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04truncated"])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.pth"):
        load_model("resnet18", weights=str(path))


def test_missing_local_file() -> None:
    with pytest.raises(WeightsError, match="weights file not found: no/such/file.pth"):
        load_model("resnet18", weights="no/such/file.pth")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet5'; did you mean resnet50"):
        load_model("resnet5")


def test_default_input_sizes() -> None:
    assert default_input_size("resnet18") == 224
    assert default_input_size("inception_v3") == 299
    assert default_input_size("vit_h_14") == 224  # without weights torchvision builds it for 224 px
    assert load_model("squeezenet1_0")[1].input_shape == (3, 224, 224)


def test_example_input_is_seeded() -> None:
    spec = ModelSpec("resnet18", input_shape=(3, 32, 32))
    first = spec.example_input(2)
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, spec.example_input(2))
    assert load_model("inception_v3")[1].example_input().shape == (1, 3, 299, 299)
    assert ModelSpec(None, input_shape=(1, 28, 20)).example_input(3).shape == (3, 1, 28, 20)


def test_model_source_seam() -> None:
    source = resolve_source("resnet18")
    assert isinstance(source.build(10), torch.nn.Module) and source.build(10).fc.out_features == 10
    with pytest.raises(UnknownModelError, match="did you mean resnet18"):
        resolve_source("resnet-18")
    with pytest.raises(UnknownModelError, match="in memory"):
        resolve_source(None)


def test_wrong_file_in_hub_cache_is_summarised(torch_home: Path) -> None:
    path = hub_cache_file(R18_V1)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_model("resnet18", weights="IMAGENET1K_V1")
    assert str(info.value) == (
        f"weights file {path} does not fit resnet18(num_classes=1000): 2 shape mismatch(es) "
        "(fc.weight: file [10, 512], model [1000, 512], fc.bias: file [10], model [1000])"
    )


def test_head_size_is_inferred_for_models_that_cannot_be_built_on_meta(tmp_path: Path) -> None:
    # regnets compute their widths from tensor values, so the meta-device skeleton fails for them
    path = tmp_path / "regnet.pth"
    torch.save(torchvision.models.regnet_x_400mf(weights=None, num_classes=3).state_dict(), path)
    model, spec = load_model("regnet_x_400mf", weights=str(path))
    assert spec.num_classes == 3 and model.fc.out_features == 3
