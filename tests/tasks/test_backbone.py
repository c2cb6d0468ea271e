"""resolve_backbone: names go through create_model, modules are used as given (optionally with a weight file)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from visionkit import save_state_dict
from visionkit.tasks import resolve_backbone
from visionkit.weights import CheckpointMismatchError


def test_a_name_builds_the_model_with_its_arguments():
    model = resolve_backbone("test_resnet", num_classes=0)
    assert type(model).__name__ == "ResNet"
    assert model.num_classes == 0
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, model.num_features)
    vit = resolve_backbone("vit_tiny_patch16_224", img_size=32, num_classes=5)
    assert vit.patch_embed.img_size == (32, 32) and vit.head.out_features == 5


def test_a_name_with_a_checkpoint_loads_its_weights(tmp_path):
    source = timm.create_model("test_resnet", num_classes=3)
    save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    model = resolve_backbone("test_resnet", checkpoint_path=str(tmp_path / "w.safetensors"))
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_module_is_returned_as_is():
    module = nn.Linear(3, 4)
    assert resolve_backbone(module) is module


def test_a_module_with_a_checkpoint_loads_it_strictly(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert resolve_backbone(target, checkpoint_path=tmp_path / "w.safetensors") is target
    torch.testing.assert_close(target[1].weight, source[1].weight, rtol=0, atol=0)

    wrong_keys = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(2\): 1.bias, 1.weight"):
        resolve_backbone(wrong_keys, checkpoint_path=tmp_path / "w.safetensors")
    wrong_shape = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)injected backbone .*0.weight: checkpoint \(4, 3\), model \(5, 3\)"
    ):
        resolve_backbone(wrong_shape, checkpoint_path=tmp_path / "w.safetensors")


def test_a_module_cannot_be_pretrained_and_ignores_model_arguments_with_a_warning():
    module = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"pretrained=True cannot apply to the injected backbone module .*Linear"):
        resolve_backbone(module, pretrained=True)
    with pytest.warns(UserWarning, match=r"model arguments \['drop_path_rate', 'num_classes'\] .* are ignored"):
        assert resolve_backbone(module, num_classes=0, drop_path_rate=0.1, img_size=None) is module


def test_bad_backbone_values_are_clear_errors():
    with pytest.raises(TypeError, match=r"backbone is None: .*load_from_checkpoint\(path, backbone=module\)"):
        resolve_backbone(None)
    with pytest.raises(TypeError, match=r"must be a registered model name or an nn\.Module, got int"):
        resolve_backbone(3)
    with pytest.raises(ValueError, match="Unknown model 'resnet_nope'"):
        resolve_backbone("resnet_nope")
