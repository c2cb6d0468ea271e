"""Property test: any annotation file either yields contract-conforming targets or raises a documented error."""

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionkit.data.coco import COCODataset, COCOFormatError
from visionkit.data.image_io import ImageReadError

DOCUMENTED_ERRORS = (COCOFormatError, FileNotFoundError, ImageReadError)

# Anything a hand-edited or buggy exporter might put where a value belongs.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-5, 50), max_size=7),
    st.lists(st.lists(st.floats(-5, 50), max_size=4), max_size=2),
    st.dictionaries(st.sampled_from(["size", "counts", "x"]), st.integers(-3, 30), max_size=2),
)


@st.composite
def segmentations(draw: st.DrawFn, height: int, width: int) -> Any:
    kind = draw(st.sampled_from(["polygon", "compressed", "uncompressed"]))
    if kind == "polygon":
        coordinate = st.floats(-3.0, float(max(height, width)) + 3.0, allow_nan=False)
        polygons = st.lists(st.lists(coordinate, min_size=3, max_size=5).map(lambda xs: xs * 2), min_size=1, max_size=2)
        return draw(polygons)
    seed = draw(st.integers(0, 2**16))
    mask = np.random.default_rng(seed).random((height, width)) < draw(st.floats(0.0, 1.0))
    if kind == "compressed":
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    flat = mask.reshape(-1, order="F").astype(np.int8)
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(boundaries).tolist()
    return {"size": [height, width], "counts": [0, *counts] if flat[0] else counts}


@st.composite
def valid_instances(draw: st.DrawFn) -> dict[str, Any]:
    sizes = draw(st.lists(st.tuples(st.integers(4, 20), st.integers(4, 20)), min_size=1, max_size=3))
    image_ids = draw(st.lists(st.integers(0, 10**6), min_size=len(sizes), max_size=len(sizes), unique=True))
    images = [
        {"id": image_id, "file_name": f"{i}.png", "height": h, "width": w}
        for i, (image_id, (h, w)) in enumerate(zip(image_ids, sizes, strict=True))
    ]
    category_ids = draw(st.lists(st.integers(1, 200), min_size=1, max_size=4, unique=True))
    categories = [{"id": cid, "name": f"class{cid}"} for cid in category_ids]
    annotations = []
    # Mostly plain integer boxes (hypothesis' float draws cluster at the bounds, i.e. at degenerate boxes).
    box = st.one_of(st.integers(-5, 20).map(float), st.floats(-5.0, 25.0, allow_nan=False))
    extent = st.one_of(st.integers(2, 16).map(float), st.floats(0.0, 20.0, allow_nan=False))
    for annotation_id in range(1, draw(st.integers(0, 6)) + 1):
        image = draw(st.sampled_from(images))
        annotation = {
            "id": annotation_id,
            "image_id": image["id"],
            "category_id": draw(st.sampled_from(category_ids)),
            "bbox": [draw(box), draw(box), draw(extent), draw(extent)],
            "iscrowd": draw(st.sampled_from([0, 0, 0, 1])),
            "segmentation": draw(segmentations(image["height"], image["width"])),
        }
        if draw(st.booleans()):
            annotation["area"] = draw(st.floats(0.0, 400.0))
        annotations.append(annotation)
    return {"images": images, "annotations": annotations, "categories": categories}


@st.composite
def faulty_instances(draw: st.DrawFn) -> dict[str, Any]:
    """A valid file with zero or one injected fault."""
    content = draw(valid_instances())
    fault = draw(
        st.sampled_from(
            ["none", "wrong_type", "missing_key", "bad_polygon", "dangling", "bad_box", "duplicate", "bad_rle", "junk"]
        )
    )
    records = [r for key in ("images", "annotations", "categories") for r in content[key]]
    annotations = content["annotations"]
    if fault == "wrong_type":
        record = draw(st.sampled_from(records))
        record[draw(st.sampled_from(sorted(record)))] = draw(junk)
    elif fault == "missing_key":
        if draw(st.booleans()):
            del content[draw(st.sampled_from(sorted(content)))]
        else:
            record = draw(st.sampled_from(records))
            del record[draw(st.sampled_from(sorted(record)))]
    elif fault == "bad_polygon" and annotations:
        polygon = draw(st.lists(st.one_of(st.floats(-2, 30), junk), max_size=8))
        draw(st.sampled_from(annotations))["segmentation"] = draw(st.sampled_from([[polygon], polygon, [[], polygon]]))
    elif fault == "dangling" and annotations:
        draw(st.sampled_from(annotations))[draw(st.sampled_from(["image_id", "category_id"]))] = -draw(
            st.integers(1, 10**6)
        )
    elif fault == "bad_box" and annotations:
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, -1e-6]))
        bbox = draw(st.sampled_from(annotations))["bbox"]
        bbox[draw(st.integers(0, 3))] = value
        if draw(st.booleans()):
            bbox.pop()
    elif fault == "duplicate":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        if len(content[key]) >= 2:
            content[key][1]["id"] = content[key][0]["id"]
    elif fault == "bad_rle" and annotations:
        annotation = draw(st.sampled_from(annotations))
        annotation["segmentation"] = {
            "size": draw(st.sampled_from([[4, 4], [20, 20], [-1, 5], "4x4"])),
            "counts": draw(st.one_of(st.text(max_size=12), st.lists(st.integers(-2, 500), max_size=5))),
        }
    elif fault == "junk":
        return draw(st.one_of(junk, st.just(content)))
    return content


def _write_files(root: Path, content: Any, file_state: str) -> Path:
    """Write an image per well-formed image record (sizes capped at 64 px) plus the JSON; return the JSON path."""
    images = content.get("images") if isinstance(content, dict) else None
    for index, image in enumerate(images if isinstance(images, list) else []):
        if not isinstance(image, dict) or not all(type(image.get(k)) is int for k in ("height", "width")):
            continue
        height, width = min(max(image["height"], 1), 64), min(max(image["width"], 1), 64)
        path = root / f"{index}.png"
        if file_state == "missing" and index == 0:
            continue
        if file_state == "corrupt" and index == 0:
            path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            continue
        if file_state == "wrong_size" and index == 0:
            height += 1
        Image.new("RGB", (width, height), (index * 40, 90, 200)).save(path)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(content))
    return ann_file


def _load_all(root: Path, ann_file: Path) -> tuple[COCODataset, list[tuple[torch.Tensor, dict[str, Any]]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-box and EXIF warnings are tested elsewhere
        dataset = COCODataset(root, ann_file)
        return dataset, [dataset[i] for i in range(len(dataset))]


def _assert_contract(dataset: COCODataset, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
    assert len(items) == len(dataset.image_ids)
    for (image, target), image_id in zip(items, dataset.image_ids, strict=True):
        _, height, width = image.shape
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert target["image_id"] == image_id and type(target["image_id"]) is int
        assert target["orig_size"] == (height, width)
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        count = len(labels)
        assert boxes.dtype == torch.float32 and boxes.shape == (count, 4)
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < dataset.num_classes)).all()
        assert masks.dtype == torch.bool and masks.shape == (count, height, width)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


@given(content=faulty_instances(), file_state=st.sampled_from(["ok", "ok", "ok", "missing", "wrong_size", "corrupt"]))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_file_yields_contract_targets_or_a_documented_error(content: Any, file_state: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        ann_file = _write_files(root, content, file_state)
        try:
            dataset, items = _load_all(root, ann_file)
        except DOCUMENTED_ERRORS:
            return
        _assert_contract(dataset, items)


@given(content=valid_instances())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_files_always_load(content: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        dataset, items = _load_all(root, _write_files(root, content, "ok"))
        assert sorted(dataset.image_ids) == sorted(image["id"] for image in content["images"])
        _assert_contract(dataset, items)


@st.composite
def rle_strings(draw: st.DrawFn) -> tuple[str, int]:
    """A compressed-RLE string of a random mask, possibly cut short or corrupted, and the expected pixel count."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    mask = np.random.default_rng(seed).random((height, width)) < draw(st.floats(0.0, 1.0))
    counts = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    fault = draw(st.sampled_from(["none", "none", "truncate", "replace", "append", "area"]))
    area = height * width
    if fault == "truncate":
        counts = counts[: draw(st.integers(0, len(counts)))]
    elif fault == "replace" and counts:
        position = draw(st.integers(0, len(counts) - 1))
        counts = counts[:position] + chr(draw(st.integers(32, 126))) + counts[position + 1 :]
    elif fault == "append":
        counts += draw(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=4))
    elif fault == "area":
        area += draw(st.sampled_from([-1, 1]))
    return counts, area


@given(strings=st.lists(rle_strings(), min_size=1, max_size=12), chunk_bytes=st.sampled_from([5, 64, 1 << 22]))
@settings(max_examples=150, deadline=None)
def test_vectorised_rle_check_agrees_with_the_reference_decoder(
    strings: list[tuple[str, int]], chunk_bytes: int
) -> None:
    from visionkit.utils import coco_format

    counts = [c for c, _ in strings]
    areas = [a for _, a in strings]
    problems, sums = coco_format.check_compressed_rles(counts, areas, chunk_bytes=chunk_bytes)  # many chunks too
    for text, area, problem, total in zip(counts, areas, problems.tolist(), sums.tolist(), strict=True):
        runs = coco_format.decode_rle_string(text)
        valid = runs is not None and min(runs, default=0) >= 0 and sum(runs) == area
        assert valid == (problem == 0), (text, area, problem)
        if valid:
            assert total == area
