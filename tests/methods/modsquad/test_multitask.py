"""MultiTaskTask's model side: the one-task views, the shared backbone, loss combination, task draws and export."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

import visionkit
from visionkit.methods.modsquad import (
    MultiTaskTask,
    RouterTuning,
    TaskView,
    UncertaintyWeighting,
    export_task,
    find_routing_stats,
    mutual_information_total,
)
from visionkit.tasks import ClassificationTask, InstanceSegmentationTask, SemanticSegmentationTask

TASKS = {
    "coco": {
        "kind": "instance_segmentation",
        "num_classes": 3,
        "min_size": 64,
        "max_size": 64,
        "fpn_channels": 16,
        "representation_size": 32,
        "mask_head_channels": [16],
        "box_score_thresh": 0.0,
    },
    "ade20k": {"kind": "semantic_segmentation", "num_classes": 4, "decode_channels": 16, "aux_channels": 8},
    "cls": {"kind": "classification", "num_classes": 3},
}


def build(**kwargs) -> MultiTaskTask:
    torch.manual_seed(0)
    module = MultiTaskTask(tasks=TASKS, **kwargs)
    for name, param in module.backbone.named_parameters():
        if ".f_gate." in name:  # spread tokens over experts (routers start at zero)
            torch.nn.init.normal_(param, std=1.0)
    return module


def record_usage(module: MultiTaskTask, x: Tensor) -> None:
    module.train()
    with torch.no_grad():
        for task in module.task_names:
            module.backbone(x, task=task)
    mutual_information_total(module.routing_stats)
    module.eval()


def test_heads_are_the_generic_tasks_on_views_of_one_backbone() -> None:
    module = build()
    assert isinstance(module.heads["coco"], InstanceSegmentationTask)
    assert isinstance(module.heads["ade20k"], SemanticSegmentationTask)
    assert isinstance(module.heads["cls"], ClassificationTask)
    assert [module.heads[name].task_scope for name in module.task_names] == ["coco", "ade20k", "cls"]
    keys = list(module.state_dict())
    # the backbone's weights are stored (and optimised) once, under backbone.*
    assert sum(key.endswith("blocks.0.attn.q_proj.experts.w") for key in keys) == 1
    assert "backbone.blocks.0.attn.q_proj.experts.w" in keys
    assert not any(key.startswith("heads.") and ".blocks." in key for key in keys)
    assert len(list(module.parameters())) == len({id(p) for p in module.parameters()})
    for view in (module.heads["cls"].backbone, module.heads["ade20k"].backbone):
        assert isinstance(view, TaskView) and not list(view.parameters())
    # the dense heads' pyramids did not prune the shared model's norm / pooling (classification still needs them)
    assert isinstance(module.backbone.fc_norm, torch.nn.LayerNorm)


def test_views_run_their_task() -> None:
    module = build().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for name in module.task_names:
            view = TaskView(module.backbone, name)
            assert torch.equal(view.forward_features(x), module.backbone.forward_features(x, task=name))
        other = module.backbone.forward_features(x, task="coco")
        assert not torch.equal(TaskView(module.backbone, "cls").forward_features(x), other)
        logits = module(x, "cls")
        reference = module.heads["cls"].head(
            module.backbone.forward_head(module.backbone.forward_features(x, "cls"), True)
        )
    assert torch.equal(logits, reference)


def test_view_refuses_changes_of_the_shared_model() -> None:
    model = visionkit.create_model("modsquad_vit_test", num_classes=0, task_names=["a", "b"])
    view = TaskView(model, "b")
    assert view.prune_intermediate_layers([3], prune_norm=True, prune_head=True) == [3]
    assert len(model.blocks) == 4
    with pytest.raises(ValueError, match="keeps its classifier in its own head"):
        view.reset_classifier(5)
    with pytest.raises(KeyError, match="unknown task 'c'"):
        TaskView(model, "c")
    with pytest.raises(TypeError, match="multi-task backbone"):
        TaskView(torch.nn.Linear(2, 2), "a")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": {}}, "needs `tasks`"),
        ({"tasks": {"a": {"kind": "detection"}}}, "its spec needs `kind`"),
        ({"tasks": {"a": {"kind": "classification", "backbone": "resnet18"}}}, "settings of the shared backbone"),
        ({"tasks": TASKS, "sampling": "random"}, "sampling must be"),
        ({"tasks": TASKS, "loss_weights": {"imagenet": 1.0}}, "names tasks \\['imagenet'\\]"),
    ],
)
def test_configuration_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MultiTaskTask(**kwargs)


def test_fixed_and_uncertainty_weighting() -> None:
    losses = {"coco": torch.tensor(2.0), "cls": torch.tensor(0.5)}
    fixed = build(loss_weights={"coco": 0.5})
    assert fixed.combine_losses(losses).item() == pytest.approx(0.5 * 2.0 + 0.5)
    learnt = build(loss_weighting="uncertainty")
    with torch.no_grad():
        learnt.uncertainty.params.copy_(torch.tensor([1.0, 3.0, 2.0]))
    # coco = task 0 (s = 1), cls = task 2 (s = 2): 0.5 / s² · L + log(1 + s²), the absent task adds nothing
    expected = 0.5 * 2.0 + math.log(2.0) + 0.5 / 4 * 0.5 + math.log(5.0)
    assert learnt.combine_losses(losses).item() == pytest.approx(expected)
    full = UncertaintyWeighting(3)
    assert full(torch.ones(3)).item() == pytest.approx(3 * (0.5 + math.log(2.0)))
    with pytest.raises(ValueError, match="expected 2 task losses"):
        full([torch.tensor(1.0)], tasks=[0, 1])


def test_step_tasks_by_sampling_option() -> None:
    batch = {"coco": None, "ade20k": None, "cls": None}
    assert build().step_tasks(batch) == ["coco", "ade20k", "cls"]
    assert build(sampling="per_rank").step_tasks({"ade20k": None}) == ["ade20k"]
    per_step = build(sampling="per_step", seed=3)
    draws = [per_step.step_tasks(batch) for _ in range(3)]
    assert len(draws[0]) == 1 and draws[0] == draws[1] == draws[2]  # a function of (seed, global step)
    with pytest.raises(KeyError, match="does not have"):
        build().step_tasks({"imagenet": None})


def test_export_gives_a_smaller_standalone_task_with_the_same_outputs(tmp_path) -> None:
    module = build()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    record_usage(module, x)
    total = sum(p.numel() for p in module.parameters())
    for name in module.task_names:
        standalone, report, config = export_task(module, name, keep_softmax_mass=True)
        assert sum(p.numel() for p in standalone.parameters()) < total
        assert report.params_after < report.params_before
        kwargs = config["init_args"]["backbone_kwargs"]
        assert kwargs["task_names"] == [name] and len(kwargs["attn_experts"]) == 2 and len(kwargs["mlp_experts"]) == 2
        with torch.no_grad():
            if name == "coco":  # the detector's features (its untrained boxes are near-ties that any rounding reorders)
                full, small = module.heads[name].model.backbone(x), standalone.model.backbone(x)
                for level in full:
                    assert torch.allclose(full[level], small[level], atol=1e-4)
            else:
                assert torch.allclose(module.heads[name](x), standalone(x), atol=1e-4)
    # the config rebuilds it by name and loads the weights through init_checkpoint
    path = tmp_path / "cls.safetensors"
    standalone, _, config = export_task(module, "cls", keep_softmax_mass=True)
    visionkit.save_state_dict(standalone.state_dict(), path)
    rebuilt = ClassificationTask(**config["init_args"], init_checkpoint=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), standalone(x))


def test_export_errors() -> None:
    module = build()
    with pytest.raises(KeyError, match="unknown task 'imagenet'"):
        export_task(module, "imagenet")
    with pytest.raises(ValueError, match="no recorded usage"):
        export_task(module, "cls")


def test_per_layer_expert_counts_and_removed_rows() -> None:
    model = visionkit.create_model(
        "modsquad_vit_test", attn_experts=[3, 5], mlp_experts=[2, 4], removed_router_rows=[1, 0, 2, 0]
    )
    assert [model.blocks[i].attn.num_experts for i in (0, 2)] == [3, 5]
    assert [model.blocks[i].mlp.num_experts for i in (1, 3)] == [2, 4]
    assert model.blocks[0].attn.q_proj.removed_router.weight.shape == (1, 32)
    assert model.blocks[1].mlp.removed_router is None
    assert model.blocks[2].attn.q_proj.removed_router.weight.shape == (2, 32)
    with pytest.raises(ValueError, match="one count per MoE layer"):
        visionkit.create_model("modsquad_vit_test", removed_router_rows=[1])
    with pytest.raises(ValueError, match="attn_experts must be"):
        visionkit.create_model("modsquad_vit_test", attn_experts=[3])
    assert find_routing_stats(model) == {}


def test_fit_start_checks_the_datamodule_against_the_model() -> None:
    module = build(sampling="per_rank")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(task_names=["coco", "cls"], sampling="per_rank"))
    module.on_fit_start()  # a subset of the tasks, same per-rank choice: fine
    module._trainer.datamodule.sampling = "mixed"
    with pytest.raises(ValueError, match="per_rank must be set on both"):
        module.on_fit_start()
    module._trainer.datamodule.task_names = ["imagenet"]
    with pytest.raises(ValueError, match=r"tasks \['imagenet'\] are not tasks of the model"):
        module.on_fit_start()


def test_router_tuning_freezes_all_but_routers_norms_and_heads() -> None:
    task = ClassificationTask(backbone="modsquad_vit_test", num_classes=3, backbone_kwargs={"task_names": ["cls"]})
    RouterTuning().setup(SimpleNamespace(), task, "validate")
    assert all(p.requires_grad for p in task.parameters())
    RouterTuning().setup(SimpleNamespace(), task, "fit")
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    assert "backbone.blocks.1.mlp.f_gate.0.0.weight" in trainable and "head.fc.weight" in trainable
    assert "backbone.blocks.1.mlp.experts.w" not in trainable and "backbone.patch_embed.proj.weight" not in trainable
    assert all(any(part in name for part in ("f_gate", "norm", "head")) for name in trainable)
    with pytest.raises(ValueError, match="no parameter name"):
        RouterTuning(train=["nothing_matches"]).setup(SimpleNamespace(), task, "fit")
