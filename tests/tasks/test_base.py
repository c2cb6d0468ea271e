"""BaseTask: hyper-parameters and injected modules, layer-wise learning-rate decay, frozen backbones."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader

from visionkit.tasks import BaseTask, ClassificationTask, InstanceSegmentationTask, SemanticSegmentationTask


class _ToyTask(BaseTask):
    """A task whose backbone is a given module or a two-layer MLP, with a linear head."""

    def __init__(
        self,
        backbone: str | nn.Module = "mlp",
        width: int = 4,
        lr: float = 1e-3,
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(lr=lr, layer_decay=layer_decay, freeze_backbone=freeze_backbone)

    def configure_models(self) -> None:
        spec = self.injected_modules.get("backbone", self.hparams.backbone)
        width = self.hparams.width
        self.backbone = spec if isinstance(spec, nn.Module) else nn.Sequential(nn.Linear(3, width), nn.ReLU())
        self.head = nn.Linear(width, 2)


class _NoBackboneTask(BaseTask):
    def configure_models(self) -> None:
        self.net = nn.Linear(2, 2)


def _vit_task(**kwargs) -> ClassificationTask:
    return ClassificationTask(
        "vit_tiny_patch16_224", num_classes=3, backbone_kwargs={"img_size": 32}, lr=1.0, weight_decay=0.1, **kwargs
    )


def _scale_by_param(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_hyperparameters_come_from_every_init_level_and_modules_are_injected():
    task = _ToyTask(width=5, lr=0.5)
    assert dict(task.hparams) == {
        "backbone": "mlp",
        "width": 5,
        "lr": 0.5,
        "weight_decay": 0.05,
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
        "betas": (0.9, 0.999),
        "layer_decay": None,
        "freeze_backbone": False,
    }
    assert task.injected_modules == {}

    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    injected = _ToyTask(module)
    assert injected.injected_modules == {"backbone": module}
    assert injected.backbone is module
    # recorded as None: `self.hparams.backbone` still reads, and no module ends up in a checkpoint's hyper-parameters
    assert injected.hparams.backbone is None and injected.hparams_initial.backbone is None
    assert not any(isinstance(v, nn.Module) for v in injected.hparams.values())
    # the injected module's weights are in the state dict exactly once
    assert sorted(injected.state_dict()) == ["backbone.0.bias", "backbone.0.weight", "head.bias", "head.weight"]


def test_layer_decay_matches_timm_for_the_backbone_and_gives_the_head_scale_one():
    task = _vit_task(layer_decay=0.75)
    groups = task.parameter_groups()
    got = _scale_by_param(groups)
    backbone = task.backbone
    # timm's rule on the same ViT with its classifier: the classifier is the top layer, as the task's head is here
    full = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    full_groups = param_groups_layer_decay(
        full, weight_decay=0.1, no_weight_decay_list=tuple(full.no_weight_decay()), layer_decay=0.75
    )
    full_params = dict(full.named_parameters())
    expected = {name: _scale_by_param(full_groups)[id(full_params[name])] for name in full_params}
    for name, param in backbone.named_parameters():
        assert got[id(param)] == pytest.approx(expected[name]), name
    assert expected["head.weight"] == (1.0, 0.1)
    # Hand-checked: ViT-Tiny depth 12 -> 14 layer groups (stem 0, blocks 1..12 with the final norm in 12, head 13):
    # block i has scale 0.75 ** (13 - (i + 1)); the stem 0.75 ** 13; the task head 1.
    assert got[id(backbone.blocks[0].attn.qkv.weight)] == pytest.approx((0.75**12, 0.1))
    assert got[id(backbone.blocks[0].attn.qkv.weight)][0] == pytest.approx(0.031676352, rel=1e-6)
    assert got[id(backbone.blocks[11].mlp.fc1.weight)] == pytest.approx((0.75**1, 0.1))
    assert got[id(backbone.blocks[11].mlp.fc1.bias)] == pytest.approx((0.75, 0.0))
    assert got[id(backbone.pos_embed)] == pytest.approx((0.75**13, 0.0))  # ViT's no_weight_decay names
    assert got[id(backbone.cls_token)] == pytest.approx((0.75**13, 0.0))
    assert got[id(backbone.norm.weight)] == pytest.approx((0.75, 0.0))  # timm: final norm joins the last block
    assert got[id(task.head.fc.weight)] == (1.0, 0.1)
    assert got[id(task.head.fc.bias)] == (1.0, 0.0)
    # every trainable parameter is in exactly one group, and the optimiser's lr is lr * lr_scale
    assert sum(len(g["params"]) for g in groups) == len(list(task.parameters()))
    optimizer = task.configure_optimizers()["optimizer"]
    assert {round(g["lr"], 9) for g in optimizer.param_groups} == {round(0.75**k, 9) for k in range(14)}


def test_without_layer_decay_all_groups_have_scale_one():
    groups = _vit_task().parameter_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_layer_decay_needs_a_group_matcher_and_a_valid_value():
    task = _ToyTask(layer_decay=0.5)
    with pytest.raises(ValueError, match=r"layer_decay=0.5 needs a backbone with a timm `group_matcher`.*Sequential"):
        task.parameter_groups()
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        _ToyTask(layer_decay=1.5)
    with pytest.raises(AttributeError, match=r"layer_decay needs the task's backbone at `self\.backbone`"):
        _NoBackboneTask(layer_decay=0.5).parameter_groups()


def test_freeze_backbone_needs_a_backbone():
    with pytest.raises(AttributeError, match="freeze_backbone=True needs the task's backbone"):
        _NoBackboneTask(freeze_backbone=True)


def test_frozen_backbone_is_excluded_from_the_optimizer_and_stays_in_eval_mode():
    task = _ToyTask(freeze_backbone=True)
    assert not any(p.requires_grad for p in task.backbone.parameters())
    groups = task.parameter_groups()
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in task.head.parameters()}
    task.train()
    assert task.training and task.head.training and not task.backbone.training
    task.eval()
    assert not task.head.training
    assert _ToyTask().train().backbone.training  # unfrozen: follows the task


def _random_batches(num: int, size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, size, size, generator=generator), {"label": torch.tensor(i % 3)}) for i in range(4 * num)]
    return DataLoader(items, batch_size=4)


def _fit_steps(task: pl.LightningModule, steps: int) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=_random_batches(steps))


def test_linear_probing_trains_the_head_only_and_keeps_batch_norm_statistics():
    torch.manual_seed(0)
    task = ClassificationTask("test_resnet", num_classes=3, lr=0.01, freeze_backbone=True)
    backbone_before = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in task.head.state_dict().items()}
    assert any("running_mean" in k for k in backbone_before)
    _fit_steps(task, 2)
    for name, value in task.backbone.state_dict().items():  # weights and BN running stats / counters
        torch.testing.assert_close(value, backbone_before[name], rtol=0, atol=0, msg=name)
    assert all(not torch.equal(v, head_before[k]) for k, v in task.head.state_dict().items())
    assert not task.backbone.training


def test_unfrozen_backbone_trains_and_updates_batch_norm_statistics():
    torch.manual_seed(0)
    task = ClassificationTask("test_resnet", num_classes=3, lr=0.01)
    before = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    _fit_steps(task, 1)
    changed = [k for k, v in task.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("conv1.weight") for k in changed)


def test_layer_decay_lrs_follow_the_schedule_per_group():
    task = _vit_task(layer_decay=0.5, warmup_steps=0)
    optimizer = task.configure_optimizers()["optimizer"]
    head_group = next(g for g in optimizer.param_groups if any(p is task.head.fc.weight for p in g["params"]))
    stem_group = next(g for g in optimizer.param_groups if any(p is task.backbone.pos_embed for p in g["params"]))
    assert head_group["lr"] == 1.0
    assert stem_group["lr"] == pytest.approx(0.5**13)
    assert isinstance(timm.create_model("vit_tiny_patch16_224", img_size=32).group_matcher(), dict)


# Backbone -> (model arguments, names in its no_weight_decay() that must exist, 2-d weights that must still decay).
_NO_DECAY_CASES = {
    "vmamba_test": (
        {"mask_token": True},
        {"masked_embed", "layers.0.blocks.0.op.A_logs", "layers.3.blocks.0.op.A_logs", "layers.1.blocks.0.op.Ds"},
        ["patch_embed.0.weight", "layers.0.blocks.0.op.in_proj.weight", "layers.2.blocks.0.op.x_proj_weight"],
    ),
    "vit_tiny_patch16_224": (
        {"img_size": 64},
        {"pos_embed", "cls_token"},  # its list also names dist_token, which this ViT does not have
        ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight"],
    ),
}
_TASK_CLASSES = [ClassificationTask, SemanticSegmentationTask, InstanceSegmentationTask]


@pytest.mark.parametrize(("layer_decay", "freeze"), [(None, False), (0.75, False), (None, True)])
@pytest.mark.parametrize("backbone_name", sorted(_NO_DECAY_CASES))
@pytest.mark.parametrize("task_class", _TASK_CLASSES, ids=lambda c: c.__name__)
def test_backbone_no_weight_decay_is_honoured_in_every_task_and_optimiser_path(
    task_class, backbone_name, layer_decay, freeze
):
    model_kwargs, must_exist, must_decay = _NO_DECAY_CASES[backbone_name]
    task = task_class(
        backbone_name,
        num_classes=3,
        backbone_kwargs=model_kwargs,
        weight_decay=0.1,
        layer_decay=layer_decay,
        freeze_backbone=freeze,
    )
    backbone = task.backbone  # InstanceSegmentationTask: a property reaching into task.model
    params = dict(backbone.named_parameters())  # names relative to the backbone, as no_weight_decay() gives them
    exempt = {name for name in backbone.no_weight_decay() if name in params}
    assert must_exist <= exempt
    groups = task.parameter_groups()
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(decay_of)  # each once
    for name in exempt:
        if freeze:
            assert id(params[name]) not in decay_of, name  # frozen: in no group at all
        else:
            assert decay_of[id(params[name])] == 0.0, name
    if freeze:
        assert not any(id(p) in decay_of for p in backbone.parameters())
        assert any(wd == 0.1 for wd in decay_of.values())  # the head's weights still decay
    else:
        for name in must_decay:
            assert params[name].ndim >= 2 and decay_of[id(params[name])] == 0.1, name
