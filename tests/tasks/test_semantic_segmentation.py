"""SemanticSegmentationTask: sliding-window averaging, the ignore-aware loss, and fit/validate/test/predict on the
demo ADE20K set with a CNN and a ViT backbone."""

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch

from visionkit.data import ADE20KDataModule
from visionkit.tasks.semantic_segmentation import SemanticSegmentationTask, sliding_window_logits

NUM_CLASSES = 3  # demo ADE20K labels 0..3 with reduce_zero_label -> 0..2 and 255


def _constant_per_window(seen: list[torch.Tensor]):
    """A fake model whose logits are ``k + 1`` everywhere in window ``k`` of the batch (one class)."""

    def predict(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows.clone())
        values = torch.arange(1, windows.shape[0] + 1, dtype=torch.float32)
        return values[:, None, None, None].expand(-1, 1, *windows.shape[-2:]).clone()

    return predict


def test_two_overlapping_windows_are_averaged():
    seen: list[torch.Tensor] = []
    image = torch.randn(3, 4, 6)
    logits = sliding_window_logits(_constant_per_window(seen), image, 1, crop_size=(4, 4), stride=(4, 2))
    # windows at columns 0..3 (value 1) and 2..5 (value 2): columns 2 and 3 are covered twice
    expected = torch.tensor([1.0, 1.0, 1.5, 1.5, 2.0, 2.0]).expand(1, 4, 6)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(seen[0][0], image[:, :, 0:4])
    torch.testing.assert_close(seen[0][1], image[:, :, 2:6])


def test_the_last_window_is_shifted_back_to_the_border():
    seen: list[torch.Tensor] = []
    logits = sliding_window_logits(_constant_per_window(seen), torch.randn(3, 4, 7), 1, (4, 4), (4, 2))
    # ceil((7 - 4) / 2) + 1 = 3 windows starting at columns 0, 2 and 3 (not 4, which would leave the image)
    expected = torch.tensor([1.0, 1.0, 1.5, 2.0, 2.5, 2.5, 3.0]).expand(1, 4, 7)
    torch.testing.assert_close(logits, expected)
    assert seen[0].shape == (3, 3, 4, 4)


def test_a_window_larger_than_the_image_is_zero_padded_and_cropped_back():
    seen: list[torch.Tensor] = []
    image = torch.randn(3, 3, 5)
    logits = sliding_window_logits(_constant_per_window(seen), image, 1, (4, 8), (2, 4))
    assert logits.shape == (1, 3, 5)
    torch.testing.assert_close(logits, torch.ones(1, 3, 5))
    assert seen[0].shape == (1, 3, 4, 8)
    torch.testing.assert_close(seen[0][0, :, :3, :5], image)
    assert seen[0][0, :, 3:].abs().sum() == 0 and seen[0][0, :, :, 5:].abs().sum() == 0


def test_sliding_window_rejects_a_stride_larger_than_the_window():
    with pytest.raises(ValueError, match="1 <= stride <= crop_size"):
        sliding_window_logits(lambda w: w, torch.zeros(3, 8, 8), 3, (4, 4), (5, 4))


def _task(backbone: str = "resnet18", **kwargs) -> SemanticSegmentationTask:
    torch.manual_seed(0)
    return SemanticSegmentationTask(
        backbone=backbone, num_classes=NUM_CLASSES, decode_channels=32, aux_channels=16, **kwargs
    )


def test_slide_inference_equals_whole_inference_when_one_window_covers_the_image():
    task = _task(inference_mode="slide", slide_crop_size=(64, 96), slide_stride=(32, 48)).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (slide,) = task.inference_logits(images, [(64, 96)])
        task.hparams.inference_mode = "whole"
        (whole,) = task.inference_logits(images, [(64, 96)])
    assert slide.shape == (NUM_CLASSES, 64, 96)
    torch.testing.assert_close(slide, whole)


def test_loss_ignores_pixels_labelled_255():
    task = _task()
    # 2 classes would do; the task has 3, so class 2 gets -inf-like logits that do not change the hand values.
    logits = torch.tensor([[0.0, math.log(3.0), 50.0], [0.0, 0.0, -50.0], [-1e4, -1e4, -1e4]])[None, :, None, :]
    masks = torch.tensor([[[0, 0, 255]]])
    # pixel 0: softmax(0, 0) -> -log(1/2); pixel 1: softmax(log 3, 0) -> -log(3/4); pixel 2 ignored (it would be huge)
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert task.segmentation_loss(logits, masks).item() == pytest.approx(expected, rel=1e-6)
    # no valid pixel at all: 0, not nan, and still differentiable
    empty = logits.clone().requires_grad_()
    loss = task.segmentation_loss(empty, torch.full((1, 1, 3), 255))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.abs().sum() == 0


def test_loss_upsamples_low_resolution_logits_to_the_labels():
    task = _task()
    logits = torch.zeros(2, NUM_CLASSES, 4, 5)
    logits[:, 1] = 10.0  # class 1 everywhere
    masks = torch.ones(2, 16, 20, dtype=torch.long)
    masks[:, :8] = 255
    assert task.segmentation_loss(logits, masks).item() < 1e-3


def test_layer_decay_and_frozen_backbone_act_on_the_vit_only():
    task = _task("vit_tiny_patch16_224", layer_decay=0.5)
    assert task.backbone is task.pyramid.backbone
    scale_of = {id(p): group["lr_scale"] for group in task.parameter_groups() for p in group["params"]}
    vit = task.backbone
    block_scales = [scale_of[id(block.attn.qkv.weight)] for block in vit.blocks]
    # each block gets layer_decay times the scale of the next one; the embeddings lowest; heads and neck at 1
    for lower, upper in itertools.pairwise(block_scales):
        assert lower == pytest.approx(0.5 * upper)
    assert scale_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.5 * block_scales[0])
    assert {scale_of[id(p)] for p in [*task.decode_head.parameters(), *task.pyramid.pyramid.parameters()]} == {1.0}
    frozen = _task("vit_tiny_patch16_224", freeze_backbone=True).train()
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert not frozen.backbone.training
    # the simple feature pyramid and the head still train (linear-probing style)
    assert all(p.requires_grad for p in frozen.pyramid.pyramid.parameters())
    assert all(p.requires_grad for p in frozen.decode_head.parameters())


@pytest.fixture(scope="module")
def ade20k_datamodule(demo_paths):
    return ADE20KDataModule(
        data_root=str(demo_paths["ade20k"]["root"]), crop_size=64, short_side=96, batch_size=2, num_workers=0, seed=0
    )


def _trainer(tmp_path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        fast_dev_run=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize(
    ("backbone", "mode"),
    [("resnet18", "whole"), pytest.param("vit_tiny_patch16_224", "slide", marks=pytest.mark.slow)],
)
def test_fit_validate_test_predict_on_demo_ade20k(tmp_path, ade20k_datamodule, backbone, mode):
    task = _task(backbone, inference_mode=mode, slide_crop_size=(64, 64), slide_stride=(48, 48), lr=1e-3)
    trainer = _trainer(tmp_path)
    trainer.fit(task, ade20k_datamodule)
    assert {"train/loss", "train/loss_decode", "train/loss_aux"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        (metrics,) = run(task, ade20k_datamodule, verbose=False)
        assert {f"{stage}/{name}" for name in ("loss", "mIoU", "aAcc", "mAcc")} <= set(metrics)
        assert 0.0 <= metrics[f"{stage}/aAcc"] <= 1.0
    (batch,) = trainer.predict(task, ade20k_datamodule)
    dataset = ade20k_datamodule.dataset("predict")
    assert len(batch["label_maps"]) == 2
    for label_map, image_id in zip(batch["label_maps"], batch["image_id"], strict=True):
        assert label_map.dtype == torch.int64
        assert int(label_map.min()) >= 0 and int(label_map.max()) < NUM_CLASSES
        # at the original resolution of the label file
        assert tuple(label_map.shape) == tuple(dataset[image_id][1]["orig_size"])
    # checkpoints hold plain hyper-parameters only and load back with weights_only=True
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == backbone
    assert checkpoint["hyper_parameters"]["inference_mode"] == mode
    restored = SemanticSegmentationTask.load_from_checkpoint(path, weights_only=True)
    for name, value in task.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, msg=name)
