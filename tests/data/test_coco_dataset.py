import contextlib
import copy
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from visionkit.data.coco import COCODataset, COCOFormatError

EXIF_ORIENTATION = 0x0112


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.reshape(-1, order="F").astype(int)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _base_instances() -> dict[str, Any]:
    """Three images (one without annotations), categories with gaps, every segmentation format."""
    disk = np.zeros((30, 40), dtype=bool)
    yy, xx = np.mgrid[0:30, 0:40]
    disk[(xx - 25) ** 2 + (yy - 12) ** 2 <= 36] = True
    blob = np.zeros((30, 40), dtype=bool)
    blob[20:27, 3:15] = True
    blob[22:25, 15:18] = True
    crowd = np.zeros((20, 24), dtype=bool)
    crowd[2:10, 2:10] = True
    return {
        "info": {"description": "test"},
        "images": [
            {"id": 42, "file_name": "b.png", "height": 20, "width": 24},
            {"id": 7, "file_name": "a.png", "height": 30, "width": 40},
            {"id": 99, "file_name": "empty.png", "height": 16, "width": 16},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
        ],
        "annotations": [
            # image 7: two-part polygon, compressed RLE, uncompressed RLE (non-crowd)
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [2.0, 3.0, 14.0, 9.0], "area": 80.0, "iscrowd": 0,
             "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8], [12.5, 6, 16, 6, 16, 12, 12.5, 12]]},
            {"id": 2, "image_id": 7, "category_id": 90, "bbox": [19.0, 6.0, 13.0, 13.0], "area": float(disk.sum()),
             "iscrowd": 0, "segmentation": _compressed_rle(disk)},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [3.0, 20.0, 15.0, 7.0], "area": float(blob.sum()),
             "iscrowd": 0, "segmentation": _uncompressed_rle(blob)},
            # image 42: one polygon and one crowd region
            {"id": 4, "image_id": 42, "category_id": 1, "bbox": [12.0, 11.0, 10.0, 7.0], "area": 70.0, "iscrowd": 0,
             "segmentation": [[12, 11, 22, 11, 22, 18, 12, 18]]},
            {"id": 5, "image_id": 42, "category_id": 1, "bbox": [2.0, 2.0, 8.0, 8.0], "area": 64.0, "iscrowd": 1,
             "segmentation": _uncompressed_rle(crowd)},
        ],
    }  # fmt: skip


def _write(tmp_path: Path, content: dict[str, Any] | str, images: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write the JSON and, for every image record (or ``images``), an RGB PNG of the stated size."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = {image["file_name"]: (image["height"], image["width"]) for image in _base_instances()["images"]}
    rng = np.random.default_rng(0)
    for name, (height, width) in (images or {}).items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image_dir / name)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(content if isinstance(content, str) else json.dumps(content))
    return ann_file


def _dataset(tmp_path: Path, content: dict[str, Any] | str, **kwargs: Any) -> COCODataset:
    ann_file = _write(tmp_path, content)
    return COCODataset(tmp_path / "images", ann_file, **kwargs)


def test_target_follows_the_contract(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, _base_instances())
    assert len(dataset) == 3
    assert dataset.image_ids == [7, 42, 99]  # ascending image id, not file order
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target["image_id"] == 7 and type(target["image_id"]) is int
    assert target["orig_size"] == (30, 40) and all(type(v) is int for v in target["orig_size"])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (3, 4)
    assert target["boxes"].tolist() == [[2.0, 3.0, 16.0, 12.0], [19.0, 6.0, 32.0, 19.0], [3.0, 20.0, 18.0, 27.0]]
    assert target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (3, 30, 40)


def test_category_gaps_map_to_contiguous_labels_by_id(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, _base_instances())
    assert dataset.category_id_to_contiguous == {1: 0, 18: 1, 90: 2}
    assert dataset.contiguous_to_category_id == {0: 1, 1: 18, 2: 90}
    assert dataset.class_names == ["person", "dog", "toothbrush"]
    assert dataset.num_classes == 3
    assert dataset[0][1]["labels"].tolist() == [1, 2, 0]  # category ids 18, 90, 1


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools' annToMask
def test_masks_match_pycocotools_ann_to_mask(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, _base_instances())
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(dataset.ann_file))
    for index in range(len(dataset)):
        _, target = dataset[index]
        annotation_ids = reference.getAnnIds(imgIds=target["image_id"], iscrowd=False)
        expected = [reference.annToMask(a).astype(bool) for a in reference.loadAnns(annotation_ids)]
        assert len(expected) == len(target["masks"])
        for mask, expected_mask in zip(target["masks"], expected, strict=True):
            assert expected_mask.any()
            assert np.array_equal(mask.numpy(), expected_mask)


def test_crowd_annotations_are_left_out_of_the_target(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, _base_instances())
    _, target = dataset[1]  # image 42: one ordinary polygon and one crowd region
    assert target["image_id"] == 42
    assert target["boxes"].tolist() == [[12.0, 11.0, 22.0, 18.0]]
    assert len(target["masks"]) == 1
    crowd = [a for a in dataset.coco_gt["annotations"] if a["iscrowd"]]
    assert [a["id"] for a in crowd] == [5]  # still available to evaluation


def test_images_without_annotations_are_kept_unless_filtered(tmp_path: Path) -> None:
    content = _base_instances()
    content["images"].append({"id": 5, "file_name": "crowd_only.png", "height": 20, "width": 24})
    content["annotations"].append(dict(content["annotations"][4], id=6, image_id=5))
    kept = _dataset(tmp_path, content)
    assert kept.image_ids == [5, 7, 42, 99]
    _, empty_target = kept[3]
    assert empty_target["boxes"].shape == (0, 4)
    assert empty_target["labels"].shape == (0,)
    assert empty_target["masks"].shape == (0, 16, 16)
    filtered = COCODataset(tmp_path / "images", kept.ann_file, filter_empty=True)
    assert filtered.image_ids == [7, 42]  # 5 has only a crowd annotation, 99 none


def test_degenerate_boxes_are_dropped_with_one_warning(tmp_path: Path) -> None:
    content = _base_instances()
    polygon = [[1, 1, 5, 1, 5, 5, 1, 5]]
    extra = [
        {"bbox": [1.0, 1.0, 1.0, 5.0]},  # width 1
        {"bbox": [1.0, 1.0, 5.0, 0.5]},  # height 0.5
        {"bbox": [45.0, 1.0, 10.0, 5.0]},  # right of the 40 px image: width 0 after clipping
        {"bbox": [38.5, 1.0, 10.0, 5.0]},  # 1.5 px wide after clipping: kept
        {"bbox": [1.0, 1.0, 5.0, 5.0], "area": 0},  # area 0
    ]
    for offset, fields in enumerate(extra):
        annotation = {"id": 100 + offset, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": polygon}
        content["annotations"].append({"area": 16.0, **annotation, **fields})
    with pytest.warns(UserWarning, match=r"dropped 4 of 9 non-crowd annotations with degenerate boxes") as caught:
        dataset = _dataset(tmp_path, content)
    assert len(caught) == 1  # one warning for the whole dataset, not one per annotation
    message = str(caught[0].message)
    assert message.startswith(f"{dataset.ann_file}: ")
    assert "e.g. annotation ids [100, 101, 102, 104]" in message
    for index in range(len(dataset)):  # loading items warns no more
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dataset[index]
    _, target = dataset[0]
    assert target["boxes"][-1].tolist() == [38.5, 1.0, 40.0, 6.0]
    assert len(target["boxes"]) == 4


def test_boxes_are_clipped_to_the_image(tmp_path: Path) -> None:
    content = _base_instances()
    content["annotations"][3]["bbox"] = [-4.0, 15.0, 10.0, 30.0]  # image 42 is 24 x 20
    dataset = _dataset(tmp_path, content)
    assert dataset[1][1]["boxes"].tolist() == [[0.0, 15.0, 6.0, 20.0]]


def test_without_masks_segmentation_is_optional(tmp_path: Path) -> None:
    content = _base_instances()
    del content["annotations"][0]["segmentation"]
    with pytest.raises(COCOFormatError, match=r"annotations\[0\] \(id 1\): no 'segmentation' \(needed for masks\)"):
        _dataset(tmp_path, content)
    dataset = COCODataset(tmp_path / "images", tmp_path / "instances.json", with_masks=False)
    _, target = dataset[0]
    assert "masks" not in target
    assert target["labels"].tolist() == [1, 2, 0]


def test_transforms_receive_image_and_target(tmp_path: Path) -> None:
    def flip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return image.flip(-1), {**target, "flipped": True}

    plain = _dataset(tmp_path, _base_instances())
    transformed = COCODataset(plain.root, plain.ann_file, transforms=flip)
    image, target = transformed[0]
    assert target["flipped"] is True
    assert torch.equal(image, plain[0][0].flip(-1))


def test_accessors(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, _base_instances())
    assert isinstance(dataset.ann_file, Path)
    assert dataset.get_image_info(1) == {"id": 42, "file_name": "b.png", "height": 20, "width": 24}
    dataset.get_image_info(1)["id"] = 0  # a copy: the dataset is unchanged
    assert dataset.image_ids[1] == 42
    assert dataset.coco_gt["info"] == {"description": "test"}
    assert len(dataset.coco_gt["annotations"]) == 5
    assert dataset[-1][1]["image_id"] == 99
    with pytest.raises(IndexError, match="index 3 out of range for a dataset of 3 images"):
        dataset[3]


def _mutate(path: str, value: Any) -> Any:
    """A function that sets ``content[path...] = value`` (path like ``annotations.0.bbox``); DELETE removes it."""

    def apply(content: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = content
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return apply


DELETE = object()
A1, A2, A3 = (rf"annotations\[{i - 1}\] \(id {i}, image id 7\): " for i in (1, 2, 3))
AN1 = r"annotations\[0\] \(id 1\): "
MALFORMED = [
    (_mutate("annotations", DELETE), r"top level: missing key 'annotations'"),
    (_mutate("images", {"id": 1}), r"top level: 'images' must be a list, got dict"),
    (_mutate("categories", []), r"top level: 'categories' is empty"),
    (_mutate("images.1.id", 42), r"images\[1\] \(id 42\): duplicate image id \(also images\[0\]\)"),
    (_mutate("images.0.id", "42"), r"images\[0\]: 'id' must be an integer, got '42'"),
    (_mutate("images.0.height", 20.0), r"images\[0\] \(id 42\): 'height' must be a positive integer, got 20.0"),
    (_mutate("images.0.width", 0), r"images\[0\] \(id 42\): 'width' must be a positive integer, got 0"),
    (_mutate("images.0.file_name", DELETE), r"images\[0\] \(id 42\): 'file_name' must be a non-empty string, got None"),
    (_mutate("categories.1.id", 90), r"categories\[1\] \(id 90\): duplicate category id \(also categories\[0\]\)"),
    (_mutate("categories.0.name", 3), r"categories\[0\] \(id 90\): 'name' must be a string, got 3"),
    (_mutate("annotations.1.id", 1), r"annotations\[1\] \(id 1\): duplicate annotation id \(also annotations\[0\]\)"),
    (_mutate("annotations.2.id", None), r"annotations\[2\]: 'id' must be an integer, got None"),
    (_mutate("annotations.0.image_id", 1234), AN1 + r"'image_id' 1234 is not an image id listed"),
    (_mutate("annotations.0.category_id", 2), AN1 + r"'category_id' 2 is not a category id listed"),
    (_mutate("annotations.0.iscrowd", 2), AN1 + r"'iscrowd' must be 0 or 1, got 2"),
    (_mutate("annotations.0.bbox", [1, 2, 3]), AN1 + r"'bbox' must be \[x, y, width, height\]"),
    (_mutate("annotations.0.bbox", [1, 2, "3", 4]), AN1 + r"'bbox' must be .* got \[1, 2, '3', 4\]"),
    (_mutate("annotations.0.bbox", [1, 2, float("nan"), 4]), AN1 + r"'bbox' must be .*finite"),
    (_mutate("annotations.0.bbox", [1, 2, -3, 4]), AN1 + r"'bbox' has a negative width or height"),
    (_mutate("annotations.0.area", -1), AN1 + r"'area' must be a finite number >= 0, got -1"),
    (_mutate("annotations.0.segmentation", []), A1 + r"'segmentation' is an empty"),
    (_mutate("annotations.0.segmentation.1", [1, 2, 3, 4]), A1 + r"polygon 1 has 4 coordinates; a polygon needs"),
    (_mutate("annotations.0.segmentation.0", [1, 2, 3, 4, 5, 6, 7]), A1 + r"polygon 0 has 7 coordinates"),
    (_mutate("annotations.0.segmentation.0.3", "x"), A1 + r"polygon 0 holds a non-number"),
    (_mutate("annotations.0.segmentation.0.3", float("inf")), A1 + r"polygon 0 holds a non-finite coordinate"),
    (_mutate("annotations.0.segmentation.0.3", 500.0), A1 + r"polygon 0 has coordinates more than one image size"),
    (
        _mutate("annotations.0.segmentation", "poly"),
        A1 + r"'segmentation' must be a polygon list or an RLE dict, got str",
    ),
    (_mutate("annotations.1.segmentation.size", [30, 41]), A2 + r"RLE 'size' \[30, 41\]"),
    (_mutate("annotations.1.segmentation.size", ["a", "b"]), A2 + r"RLE 'size' must be \[height, width\] integers"),
    (
        _mutate("annotations.1.segmentation.counts", "zz!!"),
        A2 + r"compressed RLE 'counts' is not a valid RLE string \(a character outside '0'..'o'\): 'zz!!'",
    ),
    (_mutate("annotations.1.segmentation.counts", "é0"), A2 + r"compressed RLE 'counts' is not a valid RLE string"),
    (
        _mutate("annotations.1.segmentation.counts", "0"),
        A2 + r"compressed RLE runs sum to 0, expected height \* width = 1200",
    ),
    (
        _mutate("annotations.1.segmentation.counts", "P"),
        A2 + r"compressed RLE 'counts' is not a valid RLE string \(the last value is cut short",
    ),
    (_mutate("annotations.1.segmentation.counts", 12), A2 + r"RLE 'counts' must be a list .* or a string .*, got int"),
    (_mutate("annotations.1.segmentation.size", DELETE), A2 + r"RLE 'segmentation' needs 'size' and 'counts'"),
    (_mutate("annotations.2.segmentation.counts", [1199, 2]), A3 + r"uncompressed RLE runs sum to 1201, expected"),
    (
        _mutate("annotations.2.segmentation.counts", [1201]),
        A3 + r"uncompressed RLE has a run longer than height \* width",
    ),
    (
        _mutate("annotations.2.segmentation.counts.0", -2),
        A3 + r"uncompressed RLE 'counts' must be non-negative integers",
    ),
]


@pytest.mark.parametrize(("mutation", "message"), MALFORMED)
def test_malformed_json_raises_a_precise_error(tmp_path: Path, mutation: Any, message: str) -> None:
    content = copy.deepcopy(_base_instances())
    mutation(content)
    ann_file = tmp_path / "instances.json"
    with pytest.raises(COCOFormatError, match=re.escape(str(ann_file)) + ": " + message):
        _dataset(tmp_path, content)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", r"cannot read COCO annotation as JSON"), ("[1, 2]", r"top level: must be a JSON object, got list")],
)
def test_unparsable_files_raise(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(COCOFormatError, match=re.escape(str(tmp_path / "instances.json")) + ": " + message):
        _dataset(tmp_path, text)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.json"))):
        COCODataset(tmp_path, tmp_path / "none.json")


def test_missing_image_file_is_named_when_loaded_or_verified(tmp_path: Path) -> None:
    content = _base_instances()
    content["images"][1]["file_name"] = "missing.png"
    _write(tmp_path, content, images={"b.png": (20, 24), "empty.png": (16, 16)})
    dataset = COCODataset(tmp_path / "images", tmp_path / "instances.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "missing.png"))):
        dataset[0]
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .* are missing, e.g. \[.*missing.png"):
        COCODataset(tmp_path / "images", tmp_path / "instances.json", verify_files=True)


def test_image_size_differing_from_json_raises(tmp_path: Path) -> None:
    content = _base_instances()
    _write(tmp_path, content, images={"a.png": (30, 41), "b.png": (20, 24), "empty.png": (16, 16)})
    dataset = COCODataset(tmp_path / "images", tmp_path / "instances.json")
    expected = re.escape(f"{tmp_path / 'images' / 'a.png'}: decoded image size (H, W) = (30, 41) differs from")
    with pytest.raises(COCOFormatError, match=expected + r".*image id 7"):
        dataset[0]


def test_exif_rotated_image_annotated_on_raw_pixels_uses_raw_pixels(tmp_path: Path) -> None:
    content = _base_instances()
    _write(tmp_path, content)
    raw = np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # upright the image is 40 x 30, but the JSON says height 30, width 40
    Image.fromarray(raw).save(tmp_path / "images" / "a.png", exif=exif.tobytes())
    dataset = COCODataset(tmp_path / "images", tmp_path / "instances.json")
    with pytest.warns(UserWarning, match=r"a.png: the EXIF orientation changes the size to \(40, 30\)"):
        image, target = dataset[0]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), raw)
    assert target["masks"].shape == (3, 30, 40)


def test_compressed_rle_validator_decodes_like_pycocotools() -> None:
    from visionkit.utils.coco_format import check_compressed_rles, decode_rle_string

    rng = np.random.default_rng(0)
    strings, areas = [], []
    for shape, density in [((1, 1), 0.5), ((7, 5), 0.1), ((31, 17), 0.5), ((64, 48), 0.97), ((40, 300), 0.02)]:
        mask = rng.random(shape) < density
        expected = _uncompressed_rle(mask)["counts"]
        assert decode_rle_string(_compressed_rle(mask)["counts"]) == expected
        strings.append(_compressed_rle(mask)["counts"])
        areas.append(mask.size)
    problems, sums = check_compressed_rles(strings, areas)
    assert problems.tolist() == [0] * 5 and sums.tolist() == areas
    assert decode_rle_string("") == []
    assert decode_rle_string("P") is None  # 0x20 "more" bit set on the last character: truncated


def test_one_validator_and_one_error_type_for_data_and_eval(tmp_path: Path) -> None:
    import visionkit.data
    from visionkit.eval import COCOGroundTruth
    from visionkit.utils.coco_format import COCOFormatError as UtilsError

    assert visionkit.data.COCOFormatError is UtilsError is COCOFormatError
    content = _base_instances()
    content["annotations"][0]["bbox"] = [1, 2, float("nan"), 4]
    _write(tmp_path, content)
    message = re.escape(f"{tmp_path / 'instances.json'}: annotations[0] (id 1): 'bbox' must be")
    with pytest.raises(COCOFormatError, match=message):
        COCODataset(tmp_path / "images", tmp_path / "instances.json")
    with pytest.raises(COCOFormatError, match=message):
        COCOGroundTruth(tmp_path / "instances.json")


# ------------------------------------------------------------------------- EXIF orientation decided from the tag
def _exif_coco(tmp_path: Path, images: list[tuple[str, int | None, tuple[int, int], tuple[int, int]]]) -> Path:
    """JPEGs (name, EXIF orientation or None, stored (H, W)) and a COCO JSON giving each one's (H, W) and a box.

    Every image has a red block at the top left of its stored pixels; the box is drawn on it in the frame the JSON's
    size belongs to (the stored pixels when the JSON size is the stored size).
    """
    folder = tmp_path / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records, annotations = [], []
    for index, (name, orientation, (height, width), (json_height, json_width)) in enumerate(images, start=1):
        pixels = np.full((height, width, 3), 30, dtype=np.uint8)
        pixels[: height // 2, : width // 2] = (250, 20, 20)
        exif = Image.Exif()
        if orientation is not None:
            exif[EXIF_ORIENTATION] = orientation
        Image.fromarray(pixels).save(folder / name, exif=exif.tobytes(), quality=95)
        records.append({"id": index, "file_name": name, "height": json_height, "width": json_width})
        box = [0.0, 0.0, json_width / 2, json_height / 2]
        polygon = [0.0, 0.0, box[2], 0.0, box[2], box[3], 0.0, box[3]]
        annotations.append(
            {"id": index, "image_id": index, "category_id": 1, "bbox": box, "area": box[2] * box[3],
             "iscrowd": 0, "segmentation": [polygon]}
        )  # fmt: skip
    ann_file = tmp_path / "instances.json"
    content = {"images": records, "annotations": annotations, "categories": [{"id": 1, "name": "block"}]}
    ann_file.write_text(json.dumps(content))
    return ann_file


def test_square_exif_rotated_jpeg_annotated_on_stored_pixels_is_read_as_stored(tmp_path: Path) -> None:
    # Before, a square image was rotated silently (only a size mismatch triggered the fallback): the box on the red
    # block then pointed at the wrong corner. The tag decides now: COCO annotations are drawn on the stored pixels.
    import warnings

    from visionkit.data.image_io import read_image

    ann_file = _exif_coco(
        tmp_path,
        [("a.jpg", 6, (32, 32), (32, 32)), ("b.jpg", 6, (32, 32), (32, 32)), ("c.jpg", None, (32, 32), (32, 32))],
    )
    dataset = COCODataset(tmp_path / "images", ann_file)
    with pytest.warns(UserWarning, match=r"a\.jpg: EXIF orientation 6: rotated 90° clockwise keeps the size") as seen:
        items = [dataset[i] for i in range(3)]
    assert len([w for w in seen if "exif_orientation" in str(w.message)]) == 1  # one warning per dataset
    assert str(seen[0].message).startswith(f"COCODataset({ann_file}): ")
    for (image, target), name in zip(items, ["a.jpg", "b.jpg", "c.jpg"], strict=True):
        assert torch.equal(image, read_image(tmp_path / "images" / name, apply_exif_orientation=False))
        red = (image[0] > 150) & (image[1] < 100)
        assert torch.equal(red, target["masks"][0])  # the annotation covers the red block: aligned
    upright = COCODataset(tmp_path / "images", ann_file, exif_orientation="upright")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit choices do not warn
        rotated = upright[0][0]
        stored = COCODataset(tmp_path / "images", ann_file, exif_orientation="stored")[0][0]
    assert torch.equal(rotated, read_image(tmp_path / "images" / "a.jpg"))
    assert torch.equal(stored, items[0][0]) and not torch.equal(rotated, stored)


def test_non_square_exif_rotated_jpeg_follows_the_json_size(tmp_path: Path) -> None:
    from visionkit.data.image_io import read_image

    ann_file = _exif_coco(
        tmp_path,
        [
            ("stored.jpg", 6, (24, 40), (24, 40)),  # annotated on the stored pixels
            ("upright.jpg", 6, (24, 40), (40, 24)),  # annotated upright
            ("neither.jpg", 6, (24, 40), (30, 30)),
        ],
    )
    dataset = COCODataset(tmp_path / "images", ann_file)
    with pytest.warns(UserWarning, match=r"stored\.jpg: the EXIF orientation changes the size to \(40, 24\)"):
        assert torch.equal(dataset[0][0], read_image(tmp_path / "images" / "stored.jpg", apply_exif_orientation=False))
    assert torch.equal(dataset[1][0], read_image(tmp_path / "images" / "upright.jpg"))
    path = tmp_path / "images" / "neither.jpg"
    with pytest.raises(COCOFormatError, match=re.escape(f"{path}: decoded image size (H, W) = (24, 40) as stored,")):
        dataset[2]
    with pytest.raises(COCOFormatError, match=r"image id 3 in .*instances\.json gives"):
        dataset[2]
    with pytest.raises(COCOFormatError, match=r"the stored pixels match it: use exif_orientation='auto' or 'stored'"):
        COCODataset(tmp_path / "images", ann_file, exif_orientation="upright")[0]
