"""segment-anything adapters: safe checkpoint loading, batched box prompts, automatic masks (tiny random SAM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from visionkit.models.foundation import SamAutomaticMasks, SamBoxPrompter, build_sam, load_sam, load_sam_weights
from visionkit.weights import CheckpointMismatchError, save_state_dict


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_sam_round_trip(tmp_path: Path, tiny_sam: torch.nn.Module, suffix: str) -> None:
    path = save_state_dict(tiny_sam.state_dict(), tmp_path / f"sam{suffix}")
    loaded = load_sam("vit_test", path)
    assert not loaded.training
    for name, tensor in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_load_sam_weights_lists_missing_keys(tmp_path: Path, tiny_sam: torch.nn.Module) -> None:
    state = dict(tiny_sam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    path = save_state_dict(state, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)partial\.safetensors.*mask_decoder\.iou_token\.weight"):
        load_sam_weights(build_sam("vit_test"), path)


@pytest.mark.parametrize(("variant", "name"), [("vit_h", "sam_vit_h_4b8939.pth"), ("vit_b", "sam_vit_b_01ec64.pth")])
def test_missing_sam_checkpoint_names_file_and_url(tmp_path: Path, variant: str, name: str) -> None:
    missing = tmp_path / name
    with pytest.raises(FileNotFoundError) as info:
        load_sam(variant, missing)
    assert str(missing) in str(info.value)
    assert f"https://dl.fbaipublicfiles.com/segment_anything/{name}" in str(info.value)
    with pytest.raises(ValueError, match="Unknown SAM variant"):
        load_sam("vit_x", missing)


def test_batched_boxes_equal_single_predictor_calls(tiny_sam: torch.nn.Module) -> None:
    images = [_image(96, 80, 1), _image(60, 100, 2), _image(128, 128, 3)]
    prompter = SamBoxPrompter(tiny_sam, encoder_batch_size=2)
    prompter.set_images(images)
    assert prompter.num_images == 3 and prompter.original_size(1) == (60, 100)
    boxes = np.array([[5, 8, 60, 50], [0, 0, 99, 59], [30, 10, 45, 55], [70, 2, 98, 20]], dtype=np.float32)

    masks, iou, low_res = prompter.predict_boxes(1, boxes)
    assert masks.shape == (4, 60, 100) and masks.dtype == torch.bool
    assert iou.shape == (4,) and low_res.shape == (4, 32, 32)
    assert masks.any() and not masks.all()

    predictor = SamPredictor(tiny_sam)  # segment-anything's own one-prompt-at-a-time path
    predictor.set_image(images[1])
    for k, box in enumerate(boxes):
        logits, scores, low = predictor.predict(box=box, multimask_output=False, return_logits=True)
        torch.testing.assert_close(low_res[k], torch.from_numpy(low[0]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou[k], torch.tensor(scores[0]), rtol=1e-4, atol=1e-4)
        single = torch.from_numpy(logits[0]) > 0
        unsure = torch.from_numpy(np.abs(logits[0]) < 1e-3)
        assert torch.equal(masks[k] & ~unsure, single & ~unsure)


def test_encoder_batching_does_not_change_embeddings(tiny_sam: torch.nn.Module) -> None:
    images = [_image(96, 80, 1), _image(60, 100, 2), _image(128, 128, 3)]
    one, three = SamBoxPrompter(tiny_sam, encoder_batch_size=1), SamBoxPrompter(tiny_sam, encoder_batch_size=3)
    one.set_images(images)
    three.set_images(images)
    box = np.array([[10, 10, 50, 40]])
    for index in range(3):
        _, iou_one, low_one = one.predict_boxes(index, box)
        _, iou_three, low_three = three.predict_boxes(index, box)
        torch.testing.assert_close(low_three, low_one, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou_three, iou_one, rtol=1e-4, atol=1e-4)


def test_zero_boxes_and_bad_input(tiny_sam: torch.nn.Module) -> None:
    prompter = SamBoxPrompter(tiny_sam)
    prompter.set_images([_image(50, 70, 4)])
    masks, iou, low_res = prompter.predict_boxes(0, np.zeros((0, 4)))
    assert masks.shape == (0, 50, 70) and masks.dtype == torch.bool
    assert iou.shape == (0,) and low_res.shape == (0, 32, 32)
    with pytest.raises(IndexError, match="1 images are set"):
        prompter.predict_boxes(1, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="uint8"):
        prompter.set_images([np.zeros((10, 10, 3), dtype=np.float32)])


def test_automatic_masks_on_tiny_image(tiny_sam: torch.nn.Module) -> None:
    image = _image(48, 64, 5)
    generator = SamAutomaticMasks(
        tiny_sam, points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    out = generator.generate(image)
    count = out.masks.shape[0]
    assert count > 0
    assert out.masks.shape[1:] == (48, 64) and out.masks.dtype == torch.bool
    assert out.boxes_xyxy.shape == (count, 4) and out.predicted_iou.shape == (count,)
    assert out.stability_score.shape == (count,)
    for mask, box in zip(out.masks, out.boxes_xyxy, strict=True):
        if mask.any():  # SAM's boxes are inclusive pixel extents of the mask
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]
    defaults = SamAutomaticMasks(tiny_sam).generator
    assert (defaults.pred_iou_thresh, defaults.stability_score_thresh, defaults.box_nms_thresh) == (0.88, 0.95, 0.7)
    assert len(defaults.point_grids[0]) == 32 * 32
