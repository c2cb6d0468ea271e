"""InstanceSegmentationTask through the CLI on the demo COCO set: fit / validate / test / predict, JSON, PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from visionkit.cli import main
from visionkit.eval import evaluate_coco
from visionkit.tasks.instance_segmentation import InstanceSegmentationTask

TASK = "visionkit.tasks.instance_segmentation.InstanceSegmentationTask"
#: A tiny Mask R-CNN: ~128 px images, thin FPN and heads, few sampled anchors / RoIs.
SMALL_MODEL = [
    "--model.num_classes=3",
    "--model.min_size=96",
    "--model.max_size=160",
    "--model.fpn_channels=16",
    "--model.representation_size=32",
    "--model.mask_head_channels=[16]",
    "--model.anchor_sizes=[16, 32, 64, 128, 256]",
    "--model.box_score_thresh=0.0",
    '--model.maskrcnn_kwargs={"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16}',
]


def _args(command: str, coco_root: Path, out: Path, backbone: str = "resnet18", *extra: str) -> list[str]:
    return [
        command,
        f"--model={TASK}",
        f"--model.backbone={backbone}",
        *SMALL_MODEL,
        "--data=COCODataModule",
        f"--data.data_root={coco_root}",
        "--data.short_side=80",  # smaller than the images on disk: predictions must be pasted back at orig_size
        "--data.max_size=160",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


@pytest.mark.slow
def test_fit_validate_test_predict_with_resnet18(demo_paths, tmp_path):
    coco = demo_paths["coco"]
    results = tmp_path / "preds" / "results.json"
    # Set at fit time: LightningCLI re-applies a checkpoint's hyper-parameters over the command line (--ckpt_path).
    limits = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0"]
    cli = main(_args("fit", coco["root"], tmp_path, "resnet18", *limits, f"--model.predictions_path={results}"))
    logged = cli.trainer.logged_metrics
    assert {"train/loss", "train/loss_mask", "val/bbox_AP", "val/segm_AP50", "val/segm_ARl"} <= set(logged)
    assert {"val/segm_AP/circle", "val/bbox_AP/triangle"} <= set(logged)
    assert 0.0 <= float(logged["val/segm_AP50"]) <= 1.0
    assert InstanceSegmentationTask.monitor == "val/segm_AP" and InstanceSegmentationTask.mode == "max"
    pngs = sorted(tmp_path.rglob("val_predictions_epoch0.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")  # no modules / callables in hparams
    assert not any(key.startswith("backbone.") for key in state["state_dict"])  # the backbone is stored once
    ckpt = [f"--ckpt_path={checkpoint}"]
    validated = main([*_args("validate", coco["root"], tmp_path, "resnet18"), *ckpt])
    assert "val/segm_AP" in validated.trainer.logged_metrics
    tested = main([*_args("test", coco["root"], tmp_path, "resnet18"), *ckpt])
    assert {"test/bbox_AP50", "test/segm_AP"} <= set(tested.trainer.logged_metrics)

    main([*_args("predict", coco["root"], tmp_path, "resnet18"), *ckpt, f"--model.predictions_path={results}"])
    records = json.loads(results.read_text())
    assert records and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(records[0])
    gt = json.loads(coco["val_annotations"].read_text())
    sizes = {image["id"]: [image["height"], image["width"]] for image in gt["images"]}
    assert {r["category_id"] for r in records} <= {c["id"] for c in gt["categories"]}  # 1, 3, 7: not 0-based
    assert all(r["segmentation"]["size"] == sizes[r["image_id"]] for r in records)  # pasted at the original size
    for iou_type in ("bbox", "segm"):
        stats = evaluate_coco(coco["val_annotations"], results, iou_type=iou_type)
        assert 0.0 <= stats["AP50"] <= 1.0


@pytest.mark.parametrize(
    ("backbone", "extra"),
    [
        ("convnext_atto", []),
        ("vit_tiny_patch16_224", ['--model.backbone_kwargs={"img_size": 96, "dynamic_img_size": true}']),
        ("vit_tiny_patch16_224", []),  # built for 224: the pyramid switches it to dynamic image size
    ],
)
def test_fit_one_step_on_other_backbones(demo_paths, tmp_path, backbone, extra):
    cli = main(_args("fit", demo_paths["coco"]["root"], tmp_path, backbone, "--trainer.fast_dev_run=1", *extra))
    assert cli.trainer.global_step == 1
    assert "val/segm_AP50" in cli.trainer.logged_metrics


def test_freeze_backbone_and_layer_decay(tmp_path):
    task = InstanceSegmentationTask(
        backbone="vit_tiny_patch16_224",
        num_classes=3,
        min_size=64,
        max_size=96,
        fpn_channels=16,
        representation_size=32,
        mask_head_channels=[16],
        layer_decay=0.5,
        freeze_backbone=True,
    )
    assert task.backbone is task.model.backbone.body.backbone
    assert not any(p.requires_grad for p in task.backbone.parameters())
    task.train()
    assert not task.backbone.training and task.model.roi_heads.training
    groups = task.parameter_groups()
    backbone_ids = {id(p) for p in task.backbone.parameters()}
    assert not any(id(p) in backbone_ids for group in groups for p in group["params"])
    assert all(group["lr_scale"] == 1.0 for group in groups)  # only the heads are trained


@pytest.mark.slow
def test_resume_from_last_gives_the_same_weights_as_an_uninterrupted_run(demo_paths, tmp_path, interrupted_fit):
    coco_root = demo_paths["coco"]["root"]
    limits = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]

    def args(out: Path) -> list[str]:
        return _args("fit", coco_root, out, "resnet18", *limits, "--trainer.max_epochs=2")

    main(args(tmp_path / "straight"))
    interrupted_fit(args(tmp_path / "resumed"), epochs=1)
    main([*args(tmp_path / "resumed"), "--ckpt_path=last"])
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
        for run in ("straight", "resumed")
    )
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def _tiny_task(**kwargs) -> InstanceSegmentationTask:
    return InstanceSegmentationTask(
        backbone="resnet18",
        num_classes=3,
        min_size=64,
        max_size=96,
        fpn_channels=16,
        representation_size=32,
        mask_head_channels=[16],
        **kwargs,
    )


def test_init_checkpoint_loads_the_whole_detector_and_drop_loss_switches_heads(tmp_path):
    from visionkit.models.heads.maskrcnn import DropLossRoIHeads
    from visionkit.weights import CheckpointMismatchError

    torch.manual_seed(0)
    source = _tiny_task()
    # a Lightning-style checkpoint: {"state_dict": {"model.<key>": ...}}
    ckpt = tmp_path / "round0.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, ckpt)
    torch.manual_seed(1)
    task = _tiny_task(init_checkpoint=str(ckpt), drop_loss_iou=0.01)
    for key, value in source.model.state_dict().items():
        assert torch.equal(task.model.state_dict()[key], value), key
    assert isinstance(task.model.roi_heads, DropLossRoIHeads)
    assert task.model.roi_heads.drop_iou_thresh == 0.01
    assert type(_tiny_task().model.roi_heads) is not DropLossRoIHeads

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.extra": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointMismatchError, match=r"other\.ckpt does not fit this Mask R-CNN"):
        _tiny_task(init_checkpoint=str(other))


@pytest.mark.parametrize("segm_area", ["mask", "box"])
def test_coco_segm_area_reaches_the_evaluator_and_the_table(demo_paths, tmp_path, caplog, segm_area):
    coco = demo_paths["coco"]
    caplog.set_level(logging.INFO)
    extra = ["--trainer.limit_val_batches=1", f"--model.coco_segm_area={segm_area}"]
    cli = main(_args("validate", coco["root"], tmp_path, "resnet18", *extra))
    evaluator = cli.model.coco_evaluators["val"][""]  # the one (class-aware) evaluation of this task
    assert evaluator.segm_area == segm_area and cli.model.coco_evaluations == {"": False}
    assert f"val segm ({segm_area} area)" in caplog.text and "val bbox (epoch 0" in caplog.text
    logged = cli.trainer.logged_metrics
    assert evaluator.records, "the random-weight model should detect something at box_score_thresh=0"
    gt = json.loads(coco["val_annotations"].read_text())  # restricted to the images evaluated (one batch)
    gt["images"] = [image for image in gt["images"] if image["id"] in evaluator.image_ids]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in evaluator.image_ids]
    stats = evaluate_coco(gt, evaluator.records, iou_type="segm", segm_area=segm_area)
    for name in ("AP", "APs", "APm", "APl", "ARs", "ARm", "ARl"):
        assert float(logged[f"val/segm_{name}"]) == pytest.approx(stats[name], abs=1e-6), name
