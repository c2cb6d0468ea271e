import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest

from visionkit.data.ade20k import ADE20KDataset
from visionkit.data.coco import COCODataset
from visionkit.data.image_folder import ImageFolderClassification
from visionkit.data.image_io import read_image, read_label_map
from visionkit.data.synthetic import (
    MANIFEST_NAME,
    write_demo_data,
    write_shapes_ade20k,
    write_shapes_classification,
    write_shapes_coco,
)

SMALL = {"coco": (5, 4), "ade20k": (4, 4), "classification": (2, 1), "pretraining": (3, 2)}


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_util.decode([rle])[:, :, 0].astype(bool)


def _splits(demo_paths: dict[str, dict[str, Path]]) -> list[tuple[dict[str, Any], Path]]:
    coco = demo_paths["coco"]
    return [(json.loads(coco[f"{s}_annotations"].read_text()), coco[f"{s}_images"]) for s in ("train", "val")]


def _scene(content: dict[str, Any], position: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The image record at file position ``position`` and its annotations in z-order (annotation id order)."""
    image = content["images"][position]
    annotations = sorted((a for a in content["annotations"] if a["image_id"] == image["id"]), key=lambda a: a["id"])
    return image, annotations


def _masks(image: dict[str, Any], annotations: list[dict[str, Any]]) -> list[np.ndarray]:
    return [_decode(_to_rle(a["segmentation"], image["height"], image["width"])) for a in annotations]


def _touch(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether some pixel of ``first`` is a 4-neighbour of a pixel of ``second``."""
    grown = first.copy()
    grown[1:] |= first[:-1]
    grown[:-1] |= first[1:]
    grown[:, 1:] |= first[:, :-1]
    grown[:, :-1] |= first[:, 1:]
    return bool((grown & second).any())


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_shapes_coco(tmp_path / "a", num_train=5, num_val=2, seed=3)
    second = write_shapes_coco(tmp_path / "b", num_train=5, num_val=2, seed=3)
    other = write_shapes_coco(tmp_path / "c", num_train=5, num_val=2, seed=4)
    for key in ("train_annotations", "val_annotations"):
        assert first[key].read_bytes() == second[key].read_bytes()
        assert first[key].read_bytes() != other[key].read_bytes()
    for path in sorted(first["train_images"].iterdir()):
        assert path.read_bytes() == (second["train_images"] / path.name).read_bytes()
    ade_a, ade_b = write_shapes_ade20k(tmp_path / "a", 2, 1, seed=3), write_shapes_ade20k(tmp_path / "b", 2, 1, seed=3)
    for path in sorted(ade_a["train_annotations"].iterdir()):
        assert path.read_bytes() == (ade_b["train_annotations"] / path.name).read_bytes()


def test_train_split_does_not_depend_on_val_count(tmp_path: Path) -> None:
    few = write_shapes_coco(tmp_path / "a", num_train=4, num_val=1)
    many = write_shapes_coco(tmp_path / "b", num_train=4, num_val=3)
    assert few["train_annotations"].read_bytes() == many["train_annotations"].read_bytes()


def test_coco_adapter_reads_both_splits_without_warnings(demo_paths: dict[str, dict[str, Path]]) -> None:
    coco = demo_paths["coco"]
    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dataset = COCODataset(coco[f"{split}_images"], coco[f"{split}_annotations"])
            items = [dataset[i] for i in range(len(dataset))]
        assert len(items) == len(list(coco[f"{split}_images"].glob("*.jpg")))
        assert dataset.class_names == ["circle", "square", "triangle"]
        assert dataset.contiguous_to_category_id == {0: 1, 1: 3, 2: 7}  # ids with gaps
        for image, target in items:
            assert target["masks"].shape[1:] == image.shape[1:]
            assert target["masks"].flatten(1).any(dim=1).all()


def test_every_set_is_read_by_its_adapter(demo_paths: dict[str, dict[str, Path]]) -> None:
    for split in ("training", "validation"):
        dataset = ADE20KDataset(demo_paths["ade20k"]["root"], split=split)
        assert all(dataset[i][1]["mask"].numel() > 0 for i in range(len(dataset)))
    for split in ("train", "val"):
        dataset = ImageFolderClassification(demo_paths["classification"]["root"], split=split)
        assert [dataset[i][1]["label"].item() for i in range(len(dataset))] == dataset.targets


def test_special_scenes(demo_paths: dict[str, dict[str, Path]]) -> None:
    for content, _ in _splits(demo_paths):
        # 0: two touching squares (category 3): disjoint masks that share an edge
        image, annotations = _scene(content, 0)
        assert [a["category_id"] for a in annotations] == [3, 3]
        first, second = _masks(image, annotations)
        assert not (first & second).any() and _touch(first, second)
        # 1: two overlapping circles (category 1): the earlier one is cut by the later one
        image, annotations = _scene(content, 1)
        assert [a["category_id"] for a in annotations] == [1, 1]
        first, second = _masks(image, annotations)
        assert not (first & second).any() and _touch(first, second)
        assert isinstance(annotations[0]["segmentation"]["counts"], str)
        # 2: a crowd region stored as uncompressed RLE, plus ordinary shapes
        image, annotations = _scene(content, 2)
        crowd = [a for a in annotations if a["iscrowd"] == 1]
        assert len(crowd) == 1 and isinstance(crowd[0]["segmentation"]["counts"], list)
        assert len(annotations) > 1
        # 3: an empty image
        assert _scene(content, 3)[1] == []


def test_overlap_masks_are_the_visible_parts(demo_paths: dict[str, dict[str, Path]]) -> None:
    """Pixels in the occluded circle's mask carry its own colour, not the occluder's."""
    for content, image_dir in _splits(demo_paths):
        image, annotations = _scene(content, 1)
        pixels = read_image(image_dir / image["file_name"]).permute(1, 2, 0).numpy().astype(float)
        back, front = _masks(image, annotations)
        back_colour, front_colour = np.median(pixels[back], axis=0), np.median(pixels[front], axis=0)
        assert np.linalg.norm(back_colour - front_colour) > 40
        closer_to_front = np.linalg.norm(pixels[back] - front_colour, axis=1) < np.linalg.norm(
            pixels[back] - back_colour, axis=1
        )
        assert closer_to_front.mean() < 0.05


def test_annotation_invariants(demo_paths: dict[str, dict[str, Path]]) -> None:
    formats = set()
    for content, _ in _splits(demo_paths):
        assert [c["id"] for c in content["categories"]] == [1, 3, 7]
        annotation_ids = [a["id"] for a in content["annotations"]]
        assert len(set(annotation_ids)) == len(annotation_ids) and min(annotation_ids) >= 1
        assert min(image["id"] for image in content["images"]) >= 1
        for position in range(len(content["images"])):
            image, annotations = _scene(content, position)
            masks = _masks(image, annotations)
            for annotation, mask in zip(annotations, masks, strict=True):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                assert annotation["area"] == int(mask.sum()) > 0
                assert annotation["bbox"] == mask_util.toBbox(rle).tolist()
                segmentation = annotation["segmentation"]
                kind = "polygon" if isinstance(segmentation, list) else type(segmentation["counts"]).__name__
                formats.add(kind)
                if kind == "polygon":
                    assert annotation["category_id"] in (3, 7)  # squares and triangles only
                if not annotation["iscrowd"]:
                    assert 12 <= max(annotation["bbox"][2:]) <= 60
            for i in range(len(masks)):  # visible parts never overlap
                for j in range(i + 1, len(masks)):
                    assert not (masks[i] & masks[j]).any()
    assert formats == {"polygon", "str", "list"}


def test_ade20k_labels_match_the_scene_kinds(demo_paths: dict[str, dict[str, Path]]) -> None:
    labels_dir = demo_paths["ade20k"]["val_annotations"]
    maps = [read_label_map(path).numpy() for path in sorted(labels_dir.glob("*.png"))]
    assert set(np.unique(maps[0]).tolist()) == {0, 2}  # touching squares
    assert set(np.unique(maps[1]).tolist()) == {0, 1}  # overlapping circles
    assert set(np.unique(maps[3]).tolist()) == {0}  # empty scene
    assert all(set(np.unique(m).tolist()) <= {0, 1, 2, 3} for m in maps)


def test_classification_layout(tmp_path: Path) -> None:
    paths = write_shapes_classification(tmp_path, num_per_class_train=3, num_per_class_val=1, image_size=48)
    names = sorted(p.relative_to(paths["root"]).as_posix() for p in paths["root"].rglob("*.png"))
    assert len(names) == 12
    assert names[:4] == ["train/circle/circle_0000.png", "train/circle/circle_0001.png", "train/circle/circle_0002.png",
                         "train/square/square_0000.png"]  # fmt: skip
    assert read_image(paths["val"] / "triangle" / "triangle_0000.png").shape == (3, 48, 48)


def test_writers_refuse_to_overwrite_and_validate_arguments(tmp_path: Path) -> None:
    write_shapes_coco(tmp_path, num_train=1, num_val=1)
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "train2017")) + " exists and is not empty"):
        write_shapes_coco(tmp_path, num_train=1, num_val=1)
    write_shapes_coco(tmp_path, num_train=2, num_val=0, overwrite=True)
    assert len(list((tmp_path / "train2017").iterdir())) == 2
    with pytest.raises(ValueError, match=r"image_size must be \(min, max\) with 64 <= min <= max <= 1024"):
        write_shapes_coco(tmp_path / "x", image_size=(32, 64))
    with pytest.raises(ValueError, match="num_val must be >= 0, got -1"):
        write_shapes_coco(tmp_path / "x", num_val=-1)


def test_demo_data_is_written_once_and_repaired(tmp_path: Path) -> None:
    paths = write_demo_data(tmp_path, sizes=SMALL)
    assert sorted(paths) == ["ade20k", "classification", "coco", "pretraining"]
    manifest = json.loads(paths["coco"]["manifest"].read_text())
    assert manifest["complete"] is True
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["sizes"] == [5, 4]
    assert len(manifest["files"]) == 5 + 4 + 2
    ann_file = paths["coco"]["train_annotations"]
    first_write = ann_file.stat().st_mtime_ns

    assert write_demo_data(tmp_path, sizes=SMALL) == paths  # complete: skipped
    assert ann_file.stat().st_mtime_ns == first_write

    image = next(paths["coco"]["train_images"].iterdir())
    image.unlink()  # incomplete now: regenerated
    write_demo_data(tmp_path, kinds=["coco"], sizes=SMALL)
    assert image.is_file()
    assert ann_file.stat().st_mtime_ns != first_write

    before = ann_file.read_bytes()
    write_demo_data(tmp_path, kinds=["coco"], sizes=SMALL, force=True)
    assert ann_file.read_bytes() == before  # same seed, same bytes

    write_demo_data(tmp_path, kinds=["coco"], sizes={"coco": (6, 4)})  # other settings: regenerated
    assert len(list(paths["coco"]["train_images"].iterdir())) == 6


def test_demo_data_never_overwrites_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "precious.txt").write_text("user data")
    with pytest.raises(
        FileExistsError, match=re.escape(str(tmp_path / "coco")) + " holds files but no " + MANIFEST_NAME
    ):
        write_demo_data(tmp_path, kinds=["coco"], sizes=SMALL)
    with pytest.raises(ValueError, match=r"unknown demo kind 'voc'"):
        write_demo_data(tmp_path, kinds=["voc"])
