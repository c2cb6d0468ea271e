"""ZipTask through the CLI (tools/eval.py validate / predict) on the demo COCO set with tiny random-weight models."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models.foundation.tiny_models import TINY_ZIP_SETTINGS, zip_task_overrides
from tests.tools.tool_module import load_tool
from visionkit.cli import coco_main, main
from visionkit.data import COCODataset, ImageFolderInferenceDataModule
from visionkit.eval import COCO_STAT_NAMES, evaluate_coco
from visionkit.methods.zip import ZipConfig, ZipTask
from visionkit.methods.zip.task import original_image

REPO = Path(__file__).resolve().parents[3]
ZIP_CONFIG = REPO / "configs" / "zip" / "zip_coco_val2017.yaml"
BASELINE_CONFIG = REPO / "configs" / "zip" / "sam_clip_baseline_coco_val2017.yaml"


def _cli_args(command: str, config: Path, tiny: dict, coco_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        command,
        f"--config={config}",
        *zip_task_overrides(tiny, "baseline" if config == BASELINE_CONFIG else "zip"),
        f"--data.data_root={coco_root}",
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def _stat_keys(stage: str = "val") -> list[tuple[str, str, bool, str]]:
    """``(logged name, iou type, class_agnostic, stat)`` of the 48 summary stats ZipTask logs."""
    return [
        (f"{stage}/{'agnostic/' if agnostic else ''}{iou_type}_{stat}", iou_type, agnostic, stat)
        for agnostic in (False, True)
        for iou_type in ("bbox", "segm")
        for stat in COCO_STAT_NAMES
    ]


def _assert_logged_stats_are_those_of(logged: dict, gt: Path, results: Path) -> None:
    for name, iou_type, agnostic, stat in _stat_keys():
        expected = evaluate_coco(gt, results, iou_type=iou_type, class_agnostic=agnostic)[stat]
        assert math.isfinite(float(logged[name])), name
        assert abs(float(logged[name]) - expected) <= 1e-6, (name, float(logged[name]), expected)


@pytest.mark.slow
@pytest.mark.parametrize("config", [ZIP_CONFIG, BASELINE_CONFIG], ids=["zip", "baseline"])
def test_validate_and_predict_on_tiny_models(config, demo_paths, tiny_zip_checkpoints, tmp_path):
    coco = demo_paths["coco"]
    validated = main(_cli_args("validate", config, tiny_zip_checkpoints, coco["root"], tmp_path))
    logged = validated.trainer.logged_metrics
    assert {name for name, *_ in _stat_keys()} <= set(logged)  # 12 box + 12 mask stats, class-aware and agnostic
    assert {"val/segm_AP/circle", "val/bbox_AP/square"} <= set(logged)

    results = tmp_path / "predictions.json"
    main(
        _cli_args(
            "predict", config, tiny_zip_checkpoints, coco["root"], tmp_path, f"--model.predictions_path={results}"
        )
    )
    records = json.loads(results.read_text())
    gt = json.loads(coco["val_annotations"].read_text())
    sizes = {image["id"]: [image["height"], image["width"]] for image in gt["images"]}
    assert {r["category_id"] for r in records} <= {c["id"] for c in gt["categories"]}
    assert all(r["segmentation"]["size"] == sizes[r["image_id"]] for r in records)  # the images' stored sizes
    _assert_logged_stats_are_those_of(logged, coco["val_annotations"], results)
    # tools/eval.py coco reads the file and gives the same numbers
    offline = coco_main(["--gt", str(coco["val_annotations"]), "--results", str(results), "--iou-type", "segm", "bbox"])
    for iou_type in ("bbox", "segm"):
        assert offline[iou_type]["AP"] == pytest.approx(float(logged[f"val/{iou_type}_AP"]), abs=1e-6)


class OracleSegmenter(torch.nn.Module):
    """Returns the ground-truth masks of each demo image (found by its size), plus one wrong-class duplicate."""

    def __init__(self, class_names: list[str], dataset: COCODataset) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.truth = {}
        for index in range(len(dataset)):
            image, target = dataset[index]
            vocabulary = [self.class_names.index(dataset.class_names[label]) for label in target["labels"].tolist()]
            self.truth[tuple(image.shape[1:])] = (target["masks"], torch.tensor(vocabulary, dtype=torch.int64))

    def forward(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            masks, labels = self.truth[image.shape[:2]]
            scores = torch.linspace(0.9, 0.5, len(masks))
            if len(masks):  # a confident duplicate of the first object with another class
                masks = torch.cat([masks[:1], masks])
                labels = torch.cat([(labels[:1] + 1) % len(self.class_names), labels])
                scores = torch.cat([torch.tensor([0.95]), scores])
            out.append({"masks": masks, "boxes": torch.zeros(len(masks), 4), "scores": scores, "labels": labels})
        return out


@pytest.mark.slow
def test_logged_stats_are_those_of_the_predicted_records(demo_paths, tiny_zip_checkpoints, tmp_path, monkeypatch):
    # An oracle in place of Zip: non-trivial AP that depends on every label reaching the right category id, with a
    # vocabulary in another order than the dataset's category ids.
    coco = demo_paths["coco"]
    dataset = COCODataset(coco["val_images"], coco["val_annotations"])
    monkeypatch.setattr(
        "visionkit.methods.zip.task.build_segmenter", lambda models, names, *a, **k: OracleSegmenter(names, dataset)
    )
    names = '--model.class_names=["triangle", "square", "circle"]'
    logged = main(_cli_args("validate", ZIP_CONFIG, tiny_zip_checkpoints, coco["root"], tmp_path, names))
    logged = logged.trainer.logged_metrics
    results = tmp_path / "oracle.json"
    main(
        _cli_args(
            "predict",
            ZIP_CONFIG,
            tiny_zip_checkpoints,
            coco["root"],
            tmp_path,
            names,
            f"--model.predictions_path={results}",
        )
    )
    _assert_logged_stats_are_those_of(logged, coco["val_annotations"], results)
    for name in ("val/segm_AP", "val/bbox_AP", "val/agnostic/segm_AP"):
        assert 0.2 < float(logged[name]) < 1.0, (name, float(logged[name]))
    assert float(logged["val/segm_AP50"]) != float(logged["val/agnostic/segm_AP50"])


@pytest.mark.slow
def test_image_folder_predict_equals_zip_infer(demo_paths, tiny_zip_checkpoints, tmp_path):
    # the same images through ZipTask (Lightning, ImageFolderInferenceDataModule) and tools/zip_infer.py: one code path
    folder, tiny = demo_paths["coco"]["val_images"], tiny_zip_checkpoints
    task_json, tool_json = tmp_path / "task.json", tmp_path / "tool.json"
    main(
        [
            "predict",
            "--model=ZipTask",
            *zip_task_overrides(tiny),
            "--model.class_names=[circle, square, triangle]",
            f"--model.predictions_path={task_json}",
            "--data=ImageFolderInferenceDataModule",
            f"--data.data_root={folder}",
            "--data.batch_size=3",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    tool = load_tool("zip_infer")
    argv = ["--images", str(folder), "--classes", "circle,square,triangle", "--output", str(tool_json),
            "--clip-checkpoint", tiny["clip_checkpoint"], "--clip-arch", json.dumps(tiny["clip_arch"]),
            "--boundary-checkpoint", tiny["boundary_checkpoint"], "--boundary-arch", json.dumps(tiny["boundary_arch"]),
            "--sam-checkpoint", tiny["sam_checkpoint"], "--sam-variant", tiny["sam_variant"],
            "--set", *(f"{key}={value}" for key, value in TINY_ZIP_SETTINGS.items())]  # fmt: skip
    assert tool.main(argv) == 0
    task_records, tool_records = json.loads(task_json.read_text()), json.loads(tool_json.read_text())
    assert task_records and {r["image_id"] for r in task_records} == {1, 2, 3, 4}
    key = lambda r: (r["image_id"], -r["score"], r["segmentation"]["counts"])  # noqa: E731
    assert sorted(task_records, key=key) == sorted(tool_records, key=key)


def test_fit_is_refused_and_the_vocabulary_is_checked(demo_paths, tiny_zip_checkpoints, tmp_path):
    coco_root = demo_paths["coco"]["root"]
    with pytest.raises(RuntimeError, match="no training"):
        main(_cli_args("fit", ZIP_CONFIG, tiny_zip_checkpoints, coco_root, tmp_path, "--trainer.max_steps=1"))
    with pytest.raises(ValueError, match=r"\['zebra'\] are not categories of .*instances_val2017\.json"):
        main(
            _cli_args("validate", ZIP_CONFIG, tiny_zip_checkpoints, coco_root, tmp_path, "--model.class_names=[zebra]")
        )


def test_missing_checkpoint_fails_at_construction_naming_the_file(tmp_path):
    missing = tmp_path / "RN50x64.pt"
    with pytest.raises(FileNotFoundError, match=r"RN50x64\.pt.*openaipublic"):
        ZipTask(
            clip_checkpoint=str(missing),
            sam_checkpoint=str(tmp_path / "sam.pth"),
            method="baseline",
            clip_arch="RN50x64",
        )


def test_original_image_gives_stored_pixels_or_a_clear_error():
    pixels = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = {"image_id": 12, "orig_size": (5, 7)}
    assert np.array_equal(original_image(pixels, target), pixels.permute(1, 2, 0).numpy())
    as_float = pixels.float() / 255  # ToFloat's output: turned back exactly
    assert np.array_equal(original_image(as_float, target), pixels.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match=r"image 12: .*original size"):
        original_image(pixels[:, :4], target)
    with pytest.raises(ValueError, match=r"image 12: .*normalised"):
        original_image(as_float - 0.5, target)


def test_task_arguments_cover_zip_config_with_its_defaults():
    parameters = inspect.signature(ZipTask.__init__).parameters
    for field in fields(ZipConfig):
        assert parameters[field.name].default == field.default, field.name
    assert ZipTask.monitor == "val/segm_AP" and ZipTask.coco_evaluations == {"": False, "agnostic/": True}


def test_image_folder_datamodule_numbers_images_like_zip_infer(demo_paths):
    folder = demo_paths["coco"]["val_images"]
    datamodule = ImageFolderInferenceDataModule(str(folder), batch_size=2)
    datamodule.setup("predict")
    images, targets = next(iter(datamodule.predict_dataloader()))
    assert [t["image_id"] for t in targets] == [1, 2] and images[0].dtype == torch.uint8
    assert tuple(images[1].shape[1:]) == targets[1]["orig_size"]
    tool_items = load_tool("zip_infer").folder_items(folder)
    assert [(i + 1, Path(t)) for i, t in enumerate(datamodule.dataset("predict").paths)] == tool_items
