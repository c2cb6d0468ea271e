"""ClassificationTask: backbone + head assembly, timm classifier reuse, injected backbones through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from visionkit import save_state_dict
from visionkit.cli import main
from visionkit.models.heads.classification import ClassificationHead
from visionkit.tasks import ClassificationTask

TINY_VIT = {
    "class_path": "timm.models.vision_transformer.VisionTransformer",
    "init_args": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3},
}


@pytest.mark.parametrize(
    ("backbone", "kwargs", "dim"),
    [("test_resnet", None, 96), ("convnext_atto", None, 320), ("vit_tiny_patch16_224", {"img_size": 32}, 192)],
)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_backbone_and_head_give_logits(backbone, kwargs, dim, head):
    task = ClassificationTask(backbone, num_classes=3, backbone_kwargs=kwargs, head=head, head_hidden_dim=None).eval()
    assert isinstance(task.head, ClassificationHead) and task.head.in_features == dim
    assert task.head.hidden_dim == (dim if head == "mlp" else None)
    assert task.backbone.num_classes == 0  # the backbone's own classifier is removed
    images = torch.randn(2, 3, 32, 32)
    assert task.forward_features(images).shape == (2, dim)
    assert task(images).shape == (2, 3)
    assert {k.split(".")[0] for k in task.state_dict()} == {"backbone", "head"}


def test_linear_head_starts_from_the_backbone_classifier(tmp_path):
    source = timm.create_model("test_resnet", num_classes=3)
    save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    task = ClassificationTask("test_resnet", num_classes=3, checkpoint_path=str(tmp_path / "w.safetensors")).eval()
    torch.testing.assert_close(task.head.fc.weight, source.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(task.head.fc.bias, source.fc.bias, rtol=0, atol=0)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(task(images), source.eval()(images))  # the same network as the timm classifier
    mlp = ClassificationTask("test_resnet", num_classes=3, head="mlp", head_hidden_dim=7, head_dropout=0.1)
    assert mlp.head.hidden[0].weight.shape == (7, 96) and mlp.head.drop.p == 0.1


def test_injected_timm_module_is_used_and_non_timm_modules_are_refused():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
    task = ClassificationTask(vit, num_classes=3)
    assert task.backbone is vit and task.hparams.backbone is None
    assert task(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(TypeError, match=r"timm's contract; Sequential lacks forward_features, forward_head"):
        ClassificationTask(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), num_classes=3)
    with pytest.raises(ValueError, match="head must be 'linear' or 'mlp', got 'conv'"):
        ClassificationTask("test_resnet", num_classes=3, head="conv")


def _cli_args(root: Path, data_root: Path, config: Path, *extra: str) -> list[str]:
    return [
        f"--config={config}",
        f"--data.data_root={data_root}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_backbone_module_injected_from_yaml_trains_and_its_checkpoint_loads_weights_only(tmp_path, demo_root):
    config = tmp_path / "inject.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "ClassificationTask",
                    "init_args": {"backbone": TINY_VIT, "num_classes": 3, "head": "mlp", "layer_decay": 0.5},
                },
                "data": {"class_path": "ImageFolderDataModule", "init_args": {"image_size": 32, "batch_size": 4}},
            }
        )
    )
    cli = main(["fit", *_cli_args(tmp_path, demo_root / "classification", config)])
    assert cli.trainer.current_epoch == 1
    assert type(cli.model.backbone).__name__ == "VisionTransformer" and cli.model.backbone.embed_dim == 16
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] is None and ckpt["hyper_parameters"]["head"] == "mlp"
    assert "backbone.blocks.1.attn.qkv.weight" in ckpt["state_dict"]
    saved = yaml.safe_load((tmp_path / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"]["class_path"] == TINY_VIT["class_path"]
    # The saved config rebuilds the module: validating the checkpoint from a new CLI run works.
    val = main(["validate", *_cli_args(tmp_path, demo_root / "classification", config), "--ckpt_path=last"])
    assert "val/top1" in val.trainer.callback_metrics
    # Outside the CLI, the module is passed again.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    reloaded = ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", backbone=vit)
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    with pytest.raises(TypeError, match="backbone is None"):
        ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")


def test_linear_probe_through_the_cli_keeps_the_backbone(tmp_path, demo_root):
    config = tmp_path / "probe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "ClassificationTask",
                    "init_args": {"backbone": "test_resnet", "num_classes": 3, "freeze_backbone": True, "lr": 0.05},
                },
                "data": {"class_path": "ImageFolderDataModule", "init_args": {"image_size": 32, "batch_size": 4}},
            }
        )
    )
    cli = main(["fit", *_cli_args(tmp_path, demo_root / "classification", config), "--trainer.limit_val_batches=0"])
    torch.manual_seed(0)  # the CLI seeds 0 before building the model: same initial weights
    fresh = ClassificationTask("test_resnet", num_classes=3)
    trained = cli.model.state_dict()
    for name, value in fresh.backbone.state_dict().items():
        torch.testing.assert_close(trained[f"backbone.{name}"], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(trained["head.fc.weight"], fresh.head.fc.weight)
