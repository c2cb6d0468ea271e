"""ZipSegmenter and SamClipBaseline on tiny random-weight CLIP / SAM models: the glue between the stages."""

import numpy as np
import pytest
import torch

from visionkit.eval import coco_result_records
from visionkit.methods.zip.segmenter import SamClipBaseline, ZipConfig, ZipSegmenter
from visionkit.models.foundation import ClipResNetTrunk, SamAutomaticMasks, SamBoxPrompter

NAMES = ["circle", "square", "triangle"]
# a configuration sized for 64-96 px images and the tiny models
SMALL = ZipConfig(
    semantic_size=32, n_surgery=2, boundary_short_side=64, classifier_size=32, k=4, kmeans_iters=10, min_area=1
)


@pytest.fixture(scope="module")
def parts(tiny_clip_vit, tiny_clip_resnet, tiny_sam):
    clip_model, tokenizer = tiny_clip_vit
    return clip_model, tokenizer, ClipResNetTrunk(tiny_clip_resnet.visual).eval(), tiny_sam


def _image(seed=0, height=72, width=96):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _segmenter(parts, config=SMALL):
    clip_model, tokenizer, trunk, sam = parts
    return ZipSegmenter(clip_model, tokenizer, trunk, SamBoxPrompter(sam), NAMES, config)


def test_discovery_glue_on_a_controlled_cluster_map(parts, monkeypatch):
    # two touching squares (clusters 1 and 2) with their shared border as its own cluster 3, all activated for
    # class 1; background cluster 0 is not activated. Boxes must come out per object, in image pixels.
    seg = _segmenter(parts, ZipConfig(**{**SMALL.__dict__, "min_area": 4, "classification_first": False}))
    clusters = torch.zeros(12, 16, dtype=torch.int64)
    clusters[2:8, 2:7] = 1
    clusters[2:8, 8:13] = 2
    clusters[2:8, 7] = 3
    maps = torch.zeros(3, 72, 96)
    maps[1, 12:48, 12:78] = 1.0  # class 1 active over both squares (image = 6x the grid)
    monkeypatch.setattr(seg, "clusters", lambda image: clusters)
    monkeypatch.setattr(seg, "activation_maps", lambda image: maps)
    boxes, labels, class_scores = seg.discover(_image())
    # the border column 7 is one cell wide and 6 tall: compact (box/area = 1), activated -> kept, so with it the two
    # squares touch; this is the released rule: only a non-compact or inactive border separates
    assert labels.tolist() == [1] and boxes.tolist() == [[12.0, 12.0, 78.0, 48.0]]
    # with the border not activated (class 1 off over column 7), its fragment fails the gain test: two boxes
    maps[1, :, 42:48] = 0.0
    boxes, labels, class_scores = seg.discover(_image())
    assert sorted(boxes.tolist()) == [[12.0, 12.0, 42.0, 48.0], [48.0, 12.0, 78.0, 48.0]]
    assert labels.tolist() == [1, 1] and class_scores.shape == (2,)


def test_forward_scores_are_the_geometric_mean_of_clip_and_sam(parts, monkeypatch):
    seg = _segmenter(parts)
    image = _image(1)
    boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]])
    monkeypatch.setattr(seg, "discover", lambda img: (boxes, torch.tensor([0, 2]), torch.tensor([0.64, 0.25])))
    (out,) = seg([image])
    prompter = SamBoxPrompter(parts[3])
    prompter.set_images([image])
    masks, ious, _ = prompter.predict_boxes(0, boxes)
    assert torch.equal(out["masks"], masks) and out["masks"].shape == (2, 72, 96)
    torch.testing.assert_close(out["scores"], torch.sqrt(torch.tensor([0.64, 0.25]) * ious.clamp(0, 1)))
    assert out["labels"].tolist() == [0, 2]
    records = coco_result_records(7, out["scores"], [1, 3], masks=out["masks"])
    assert [r["category_id"] for r in records] == [1, 3]


def test_end_to_end_runs_on_tiny_models(parts):
    seg = _segmenter(parts)
    images = [_image(2), _image(3, 64, 80)]
    results = seg(images)
    again = seg(images)
    for image, out, out2 in zip(images, results, again, strict=True):
        k = out["masks"].shape[0]
        assert out["masks"].shape == (k, *image.shape[:2]) and out["boxes"].shape == (k, 4)
        assert out["scores"].shape == (k,) and ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
        assert ((out["labels"] >= 0) & (out["labels"] < len(NAMES))).all()
        for key in out:
            assert torch.equal(out[key], out2[key])  # deterministic (raster k-means init)
    agnostic = _segmenter(parts, ZipConfig(**{**SMALL.__dict__, "class_agnostic": True}))(images)
    for out in agnostic:
        assert (out["labels"] == 0).all()
    seeded = ZipConfig(**{**SMALL.__dict__, "kmeans_init": "random", "seed": 3})
    first, second = _segmenter(parts, seeded).clusters(images[0]), _segmenter(parts, seeded).clusters(images[0])
    assert torch.equal(first, second) and first.shape == (4, 5)  # 72x96 -> short side 64 -> 64x85 -> stride 16


def test_baseline_labels_sam_masks_with_clip(parts):
    clip_model, tokenizer, _, sam = parts
    generator = SamAutomaticMasks(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    baseline = SamClipBaseline(clip_model, tokenizer, generator, NAMES, classifier_size=32)
    image = _image(4)
    (out,) = baseline([image])
    found = generator.generate(image)
    assert torch.equal(out["masks"], found.masks.bool())
    assert out["scores"].shape == out["labels"].shape == (found.masks.shape[0],)
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()


def test_empty_vocabulary_is_an_error(parts):
    clip_model, tokenizer, trunk, sam = parts
    with pytest.raises(ValueError, match="class_names is empty"):
        ZipSegmenter(clip_model, tokenizer, trunk, SamBoxPrompter(sam), [], SMALL)
