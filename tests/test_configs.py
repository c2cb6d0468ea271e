"""Every YAML under configs/ runs through the CLI (fast_dev_run, CPU) on the demo data.

Configs for real datasets are templates: the test points their data at the demo set of the same format, shrinks
image and batch sizes, swaps a large backbone for the tiny member of its family and runs on one CPU process in full
precision. The rules are keyed on what the YAML holds (data paths, argument names, model names), not on file names,
so that a new config is tested without touching this file. What is checked is the config's structure: every class,
argument and value the CLI must parse and the task must accept, through one training step and validation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import yaml

from visionkit.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DEMO_PREFIX = "data/demo/"

#: Sizes in pixels used instead of larger ones, by argument name (data and model init_args, backbone_kwargs).
SMALL_SIZES: dict[str, int] = {
    "image_size": 64,
    "crop_size": 64,
    "img_size": 64,
    "short_side": 64,
    "train_short_sides": 64,
    "max_size": 128,
    "slide_crop_size": 64,
    "slide_stride": 48,
    "batch_size": 2,
    "val_batch_size": 2,
}
#: Trainer settings of a template that cannot run on one CPU process, replaced.
TRAINER_OVERRIDES: dict[str, str] = {"strategy": "auto", "precision": "32-true", "num_nodes": "1"}
#: Smaller sibling of a large model family: (pattern, replacement). Applied when the result is a timm model.
TINY_BACKBONES: tuple[tuple[str, str], ...] = (
    (r"_(small|base|large|huge|giant)_", "_tiny_"),
    (r"^convnext_\w+$", "convnext_atto"),
    (r"^resnet(34|50|101|152)(\w*)$", "resnet18"),
)


def _real_to_demo(demo_paths: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """Real dataset roots (as the templates and ``data/README`` spell them) -> the demo set of the same format."""
    return {
        "data/coco": demo_paths["coco"]["root"],
        "data/ADEChallengeData2016": demo_paths["ade20k"]["root"],
        "data/imagenet": demo_paths["classification"]["root"],
    }


def _map_path(value: str, demo_root: Path, real_to_demo: dict[str, Path]) -> str | None:
    if value.startswith(DEMO_PREFIX):
        return str(demo_root / value[len(DEMO_PREFIX) :])
    for real, demo in real_to_demo.items():
        if value == real or value.startswith(real + "/"):
            return str(demo) + value[len(real) :]
    return None


def _shrink(name: str, value: Any) -> Any:
    """``value`` capped at ``SMALL_SIZES[name]`` (ints, or each int of a list); ``None`` when nothing changes."""
    limit = SMALL_SIZES.get(name)
    if limit is None or isinstance(value, bool):
        return None
    if isinstance(value, int) and value > limit:
        return limit
    if isinstance(value, list) and all(isinstance(v, int) for v in value) and any(v > limit for v in value):
        return sorted({min(v, limit) for v in value}) if name == "train_short_sides" else [min(v, limit) for v in value]
    return None


def _tiny_backbone(name: str) -> str | None:
    for pattern, replacement in TINY_BACKBONES:
        candidate = re.sub(pattern, replacement, name)
        if candidate != name and timm.is_model(candidate):
            return candidate
    return None


def _template_overrides(config: dict, demo_root: Path, real_to_demo: dict[str, Path]) -> list[str]:
    """Command-line overrides that make a config run on the demo data, small and on one CPU process."""
    args: list[str] = []
    trainer = config.get("trainer") or {}
    args += [f"--trainer.{key}={value}" for key, value in TRAINER_OVERRIDES.items() if key in trainer]
    data_args = (config.get("data") or {}).get("init_args") or {}
    demo_data_root = None
    for key, value in data_args.items():
        mapped = _map_path(value, demo_root, real_to_demo) if isinstance(value, str) else None
        small = _shrink(key, value)
        if mapped is not None:
            args.append(f"--data.{key}={mapped}")
            demo_data_root = mapped if key == "data_root" else demo_data_root
        elif small is not None:
            args.append(f"--data.{key}={json.dumps(small)}")
    for key in ("train_ann", "val_ann", "test_ann"):
        # an annotation file that an earlier step writes (e.g. pseudo-labels) is absent from the demo set: use the
        # demo split's own annotations, which have the same format
        value = data_args.get(key)
        if demo_data_root and isinstance(value, str) and not (Path(demo_data_root) / value).exists():
            split = "train" if key == "train_ann" else "val"
            args.append(f"--data.{key}=annotations/instances_{split}2017.json")
    if data_args.get("generate_demo"):
        args.append("--data.generate_demo=false")  # never rewrite the session's shared demo set
    if "persistent_workers" in data_args:
        args.append("--data.persistent_workers=false")  # num_workers is 0 below
    model_args = (config.get("model") or {}).get("init_args") or {}
    for key, value in model_args.items():
        small = _shrink(key, value)
        if small is not None:
            args.append(f"--model.{key}={json.dumps(small)}")
    backbone = model_args.get("backbone")
    if isinstance(backbone, str) and _tiny_backbone(backbone):
        args.append(f"--model.backbone={_tiny_backbone(backbone)}")
    if model_args.get("init_checkpoint"):
        args.append("--model.init_checkpoint=null")  # the previous run's checkpoint does not exist here
    if model_args.get("pretrained"):
        args.append("--model.pretrained=false")  # no weights on CI; the test checks structure
    for key, value in (model_args.get("backbone_kwargs") or {}).items():
        small = _shrink(key, value)
        if small is not None:
            args.append(f"--model.backbone_kwargs.{key}={json.dumps(small)}")
    return args


def test_template_overrides_follow_the_yaml_content(tmp_path):
    real_to_demo = {"data/coco": tmp_path / "coco", "data/imagenet": tmp_path / "cls"}
    config = {
        "trainer": {"strategy": "ddp", "devices": 8, "precision": "bf16-mixed"},
        "model": {
            "init_args": {
                "backbone": "vit_base_patch16_224",
                "pretrained": True,
                "backbone_kwargs": {"img_size": 512, "drop_path_rate": 0.1},
                "slide_crop_size": [512, 512],
            }
        },
        "data": {
            "init_args": {
                "data_root": "data/coco",
                "val_images": "val2017",
                "train_short_sides": [640, 672, 800],
                "max_size": 1333,
                "batch_size": 2,
                "persistent_workers": True,
            }
        },
    }
    assert _template_overrides(config, tmp_path / "demo", real_to_demo) == [
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--data.data_root={tmp_path / 'coco'}",
        "--data.train_short_sides=[64]",
        "--data.max_size=128",
        "--data.persistent_workers=false",
        "--model.slide_crop_size=[64, 64]",
        "--model.backbone=vit_tiny_patch16_224",
        "--model.pretrained=false",
        "--model.backbone_kwargs.img_size=64",
    ]
    assert _map_path("data/demo/ade20k", tmp_path, real_to_demo) == str(tmp_path / "ade20k")
    assert _map_path("data/coconut", tmp_path, real_to_demo) is None
    assert _tiny_backbone("convnext_base") == "convnext_atto" and _tiny_backbone("resnet50") == "resnet18"
    assert _tiny_backbone("resnet18") is None and _tiny_backbone("vit_tiny_patch16_224") is None


@pytest.mark.parametrize("config_path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_runs_with_fast_dev_run(config_path, demo_root, demo_paths, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    args = [
        "fit",
        f"--config={config_path}",
        *_template_overrides(config, demo_root, _real_to_demo(demo_paths)),
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
