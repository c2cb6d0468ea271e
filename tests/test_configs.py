"""Every YAML under configs/ runs through the CLI (fast_dev_run, CPU) on the demo data.

Configs for real datasets are templates: the test points their data at the demo set of the same format, shrinks
image and batch sizes, swaps a large backbone for the tiny member of its family and runs on one CPU process in full
precision. The rules are keyed on what the YAML holds (data paths, argument names, model names), not on file names,
so that a new config is tested without touching this file. What is checked is the config's structure: every class,
argument and value the CLI must parse and the task must accept, through one training step and validation; a task
that cannot be trained (``trainable = False``: a training-free method such as Zip) runs ``validate`` on one batch
instead. Foundation-model checkpoints (an argument ``<name>_checkpoint`` next to ``<name>_arch`` /
``<name>_variant``) are replaced by tiny random-weight models of the same family written to temporary files
(``tiny_zip_checkpoints``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import yaml

import visionkit.methods
from visionkit.cli import main
from visionkit.data import SHAPE_CLASS_NAMES
from visionkit.tasks import BaseTask

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
    # multi-crop pretraining (OpenUS): global / local view sides, local views per image
    "global_size": 64,
    "local_size": 32,
    "num_local": 2,
    # foundation-model pipelines (Zip): input sides for the tiny CLIP / SAM, fewer clusters, SAM points, blocks
    "semantic_size": 32,
    "classifier_size": 32,
    "boundary_short_side": 128,
    "n_surgery": 2,
    "k": 4,
    "kmeans_iters": 10,
    "min_area": 1,
    "points_per_side": 4,
}
#: Trainer settings of a template that cannot run on one CPU process, replaced.
TRAINER_OVERRIDES: dict[str, str] = {"strategy": "auto", "precision": "32-true", "num_nodes": "1"}
#: Smaller sibling of a large model family: (pattern, replacement). Applied when the result is a timm model.
TINY_BACKBONES: tuple[tuple[str, str], ...] = (
    (r"_(small|base|large|huge|giant)_", "_tiny_"),
    (r"^convnext_\w+$", "convnext_atto"),
    (r"^resnet(34|50|101|152)(\w*)$", "resnet18"),
    (r"^vmamba_(tiny|small|base)$", "vmamba_test"),
    (r"^modsquad_vit_(small|base)$", "modsquad_vit_test"),
)
#: Foundation-model architecture (the value of ``<name>_arch`` / ``<name>_variant`` next to ``<name>_checkpoint``) ->
#: the keys of the tiny random-weight model of its family in ``tiny_zip_checkpoints``: (file, architecture).
TINY_FOUNDATION: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"^ViT-", ("clip_checkpoint", "clip_arch")),  # open_clip ViT CLIP -> tiny ViT CLIP
    (r"^RN\d", ("boundary_checkpoint", "boundary_arch")),  # open_clip ModifiedResNet CLIP -> tiny ResNet CLIP
    (r"^vit_[hlb]$", ("sam_checkpoint", "sam_variant")),  # SAM ViT-H / L / B -> tiny SAM
)


def _real_to_demo(demo_paths: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """Real dataset roots (as the templates and ``data/README`` spell them) -> the demo set of the same format."""
    return {
        "data/coco": demo_paths["coco"]["root"],
        "data/ADEChallengeData2016": demo_paths["ade20k"]["root"],
        "data/imagenet": demo_paths["classification"]["root"],
        "data/us308k": demo_paths["pretraining"]["root"],
        "data/fetal_planes": demo_paths["classification"]["root"],
        "data/busbra": demo_paths["ade20k"]["root"],
        # larger demo sets of a config's own (demo_sizes): the session's demo set of the same kind
        "data/demo_large": demo_paths["coco"]["root"].parent,
    }


#: Real datasets with fewer classes than the demo set that stands in for them: ``num_classes`` raised to this many
#: labels of the demo set (BUS-BRA's 2 classes -> the ADE20K demo's labels 0..3 without ``reduce_zero_label``).
DEMO_CLASS_FLOOR: dict[str, int] = {"data/busbra": 4}


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


def _tiny_foundation(model_args: dict[str, Any], tiny: dict[str, Any]) -> list[str]:
    """Overrides pointing every ``<name>_checkpoint`` of a known foundation family at a tiny model of that family."""
    args: list[str] = []
    for key in model_args:
        prefix = key.removesuffix("_checkpoint")
        arch_key = next((k for k in (f"{prefix}_arch", f"{prefix}_variant") if k in model_args), None)
        if prefix == key or arch_key is None or not isinstance(model_args[arch_key], str):
            continue
        for pattern, (file_key, tiny_arch_key) in TINY_FOUNDATION:
            if re.search(pattern, model_args[arch_key]):
                arch = tiny[tiny_arch_key]  # a name, or a config dict (given as JSON)
                arch = arch if isinstance(arch, str) else json.dumps(arch)
                args += [f"--model.{key}={tiny[file_key]}", f"--model.{arch_key}={arch}"]
                break
    return args


def _subcommand(config: dict) -> str:
    """``fit``, or ``validate`` for a task that says it cannot be trained (``trainable = False``: training-free)."""
    class_path = str((config.get("model") or {}).get("class_path", ""))
    if "." in class_path:
        module, name = class_path.rsplit(".", 1)
        task_class = getattr(importlib.import_module(module), name)
    else:  # a bare name: a task of visionkit.tasks or of a method package (what the CLI registers)
        for method in pkgutil.iter_modules(visionkit.methods.__path__):
            importlib.import_module(f"visionkit.methods.{method.name}")
        pending, task_class = [BaseTask], None
        while pending and task_class is None:
            cls = pending.pop()
            task_class = cls if cls.__name__ == class_path else None
            pending += cls.__subclasses__()
        assert task_class is not None, f"no task class named {class_path!r}"
    return "fit" if task_class.trainable else "validate"


def _template_overrides(
    config: dict, demo_root: Path, real_to_demo: dict[str, Path], tiny_foundation: dict[str, Any] | None = None
) -> list[str]:
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
    floor = DEMO_CLASS_FLOOR.get(str(data_args.get("data_root", "")))
    if floor and isinstance(model_args.get("num_classes"), int) and model_args["num_classes"] < floor:
        args.append(f"--model.num_classes={floor}")
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
    checkpoint = model_args.get("checkpoint_path")
    if isinstance(checkpoint, str) and not (REPO / checkpoint).exists():
        args.append("--model.checkpoint_path=null")  # weights the user downloads, or an earlier run writes
    args += _tiny_foundation(model_args, tiny_foundation or {})
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
    tiny = {"clip_checkpoint": "v.st", "clip_arch": {"embed_dim": 16}, "boundary_checkpoint": "r.st",
            "boundary_arch": {"embed_dim": 8}, "sam_checkpoint": "s.st", "sam_variant": "vit_test"}  # fmt: skip
    foundation = {
        "model": {
            "class_path": "ZipTask",
            "init_args": {
                "clip_checkpoint": "weights/ViT-B-16.pt",
                "clip_arch": "ViT-B-16",
                "boundary_checkpoint": "weights/RN50x64.pt",
                "boundary_arch": "RN50x64",
                "sam_checkpoint": "weights/sam_vit_h_4b8939.pth",
                "sam_variant": "vit_h",
                "init_checkpoint": None,
                "semantic_size": 512,
            },
        }
    }
    assert _template_overrides(foundation, tmp_path, real_to_demo, tiny) == [
        "--model.semantic_size=32",
        "--model.clip_checkpoint=v.st",
        '--model.clip_arch={"embed_dim": 16}',
        "--model.boundary_checkpoint=r.st",
        '--model.boundary_arch={"embed_dim": 8}',
        "--model.sam_checkpoint=s.st",
        "--model.sam_variant=vit_test",
    ]
    assert _subcommand(foundation) == "validate"
    assert _subcommand({"model": {"class_path": "ClassificationTask"}}) == "fit"
    assert _subcommand({"model": {"class_path": "visionkit.tasks.InstanceSegmentationTask"}}) == "fit"
    assert _map_path("data/demo/ade20k", tmp_path, real_to_demo) == str(tmp_path / "ade20k")
    assert _map_path("data/coconut", tmp_path, real_to_demo) is None
    assert _tiny_backbone("convnext_base") == "convnext_atto" and _tiny_backbone("resnet50") == "resnet18"
    assert _tiny_backbone("resnet18") is None and _tiny_backbone("vit_tiny_patch16_224") is None
    assert _tiny_backbone("vmamba_small") == "vmamba_test" and _tiny_backbone("vmamba_test") is None
    assert _tiny_backbone("modsquad_vit_base") == "modsquad_vit_test"
    openus = {"model": {"init_args": {"checkpoint_path": "weights/absent.pth"}}, "data": {"init_args": {}}}
    assert _template_overrides(openus, tmp_path, real_to_demo) == ["--model.checkpoint_path=null"]


def _child_overrides(args: dict[str, Any], demo_root: Path, real_to_demo: dict[str, Path]) -> dict[str, Any]:
    """A nested datamodule's or task's ``init_args`` with the rules of :func:`_template_overrides` applied in place."""
    out = dict(args)
    for key, value in args.items():
        mapped = _map_path(value, demo_root, real_to_demo) if isinstance(value, str) else None
        small = _shrink(key, value)
        out[key] = mapped if mapped is not None else small if small is not None else value
    for key, value in (("generate_demo", False), ("persistent_workers", False), ("num_workers", 0)):
        if key in args or key == "num_workers":
            out[key] = value
    return out


def _nested_config(config: dict, demo_root: Path, real_to_demo: dict[str, Path]) -> dict | None:
    """A multi-task config (child datamodules under ``data.init_args.datamodules``, task specs under
    ``model.init_args.tasks``) rewritten with the same rules; jsonargparse cannot override inside those dicts from
    the command line. ``None`` for any other config."""
    data_args = (config.get("data") or {}).get("init_args") or {}
    if "datamodules" not in data_args:
        return None
    config = json.loads(json.dumps(config))
    children = config["data"]["init_args"]["datamodules"]
    for child in children.values():
        child["init_args"] = _child_overrides(child.get("init_args") or {}, demo_root, real_to_demo)
    tasks = (config.get("model") or {}).get("init_args", {}).get("tasks") or {}
    for name, spec in tasks.items():
        tasks[name] = {key: _shrink(key, value) or value for key, value in spec.items()}
        if spec.get("kind") == "instance_segmentation":  # COCO's 80 labels cannot be mapped to the demo's categories
            tasks[name]["num_classes"] = len(SHAPE_CLASS_NAMES)
    return config


@pytest.mark.parametrize("config_path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_runs_with_fast_dev_run(config_path, demo_root, demo_paths, tiny_zip_checkpoints, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    subcommand = _subcommand(config)
    nested = _nested_config(config, demo_root, _real_to_demo(demo_paths))
    if nested is not None:
        config_path = tmp_path / config_path.name
        config_path.write_text(yaml.safe_dump(nested))
    args = [
        subcommand,
        f"--config={config_path}",
        *_template_overrides(config, demo_root, _real_to_demo(demo_paths), tiny_zip_checkpoints),
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
        *(["--data.num_workers=0"] if nested is None else []),  # a multi-task config sets it per child
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(args)
    assert cli.trainer.state.finished
    if subcommand == "fit":
        assert cli.trainer.global_step == 1
    else:  # one validation batch, scored: the metric a checkpoint would monitor is logged
        assert cli.model.monitor in cli.trainer.logged_metrics
