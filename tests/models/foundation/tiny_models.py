"""Tiny random-weight CLIP (ViT and ModifiedResNet) and SAM models, and their checkpoint files, for CPU tests.

The one definition of the tiny configs the foundation adapters (``tests/models/foundation``), Zip
(``tests/methods/zip``, ``tests/tools``) and the config / DDP tests use; ``tests/conftest.py`` builds the shared
session fixtures (``tiny_clip_vit``, ``tiny_clip_resnet``, ``tiny_sam``, ``tiny_zip_checkpoints``) from it. Every
weight gets Gaussian noise on top of its initialisation, because open_clip and SAM leave some layers at constant or
zero inits and a test must see every weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visionkit.models.foundation import build_clip, build_sam
from visionkit.weights import save_state_dict

#: Text tower of every tiny CLIP: one 32-wide layer, the real 77-token context and vocabulary.
TEXT_CFG: dict[str, Any] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
#: Tiny ViT CLIP: 32 px, patch 8 (4x4 grid), 4 blocks (CLIP Surgery tests use up to 4), 16-d embedding.
TINY_VIT: dict[str, Any] = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "head_width": 16},
    "text_cfg": TEXT_CFG,
}
#: Tiny ModifiedResNet CLIP: width 8, one block per stage (layer3: 128 channels at stride 16).
TINY_RN: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": TEXT_CFG,
}
#: SAM variant of the tiny SAM (``visionkit.models.foundation.sam``: 128 px input, 2-block 32-wide encoder).
TINY_SAM_VARIANT = "vit_test"
#: Standard deviation of the noise added to every weight.
WEIGHT_NOISE = 0.05


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * WEIGHT_NOISE)
    return model.eval()


def random_clip(cfg: dict[str, Any] = TINY_VIT, seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip model of ``cfg`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model, _ = build_clip(cfg)
    return _perturb(model, seed)


def clip_tokenizer(cfg: dict[str, Any] = TINY_VIT) -> Any:
    """The tokenizer ``build_clip`` gives for ``cfg``."""
    return build_clip(cfg)[1]


def random_sam(seed: int = 0) -> torch.nn.Module:
    """The tiny SAM with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return _perturb(build_sam(TINY_SAM_VARIANT), seed)


def write_tiny_checkpoints(folder: Path) -> dict[str, Any]:
    """Write a tiny CLIP ViT, CLIP ResNet and SAM as safetensors files under ``folder``.

    Returns:
        ``ZipTask`` / ``load_foundation_models`` arguments: ``clip_checkpoint``, ``clip_arch``,
        ``boundary_checkpoint``, ``boundary_arch``, ``sam_checkpoint``, ``sam_variant``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "clip_checkpoint": str(save_state_dict(random_clip(TINY_VIT).state_dict(), folder / "clip_vit.safetensors")),
        "clip_arch": TINY_VIT,
        "boundary_checkpoint": str(
            save_state_dict(random_clip(TINY_RN, seed=1).state_dict(), folder / "clip_rn.safetensors")
        ),
        "boundary_arch": TINY_RN,
        "sam_checkpoint": str(save_state_dict(random_sam().state_dict(), folder / "sam.safetensors")),
        "sam_variant": TINY_SAM_VARIANT,
    }


#: Zip settings for the tiny models and the 96-160 px demo images (``ZipTask`` arguments / ``zip_infer --set``).
TINY_ZIP_SETTINGS: dict[str, int] = {
    "semantic_size": 32,
    "n_surgery": 2,
    "boundary_short_side": 128,
    "classifier_size": 32,
    "k": 4,
    "kmeans_iters": 10,
    "min_area": 1,
}


def zip_task_overrides(checkpoints: dict[str, Any], method: str = "zip") -> list[str]:
    """``--model.*`` command-line overrides: ``ZipTask`` on the tiny checkpoints with :data:`TINY_ZIP_SETTINGS`.

    Args:
        checkpoints: What :func:`write_tiny_checkpoints` returned.
        method: ``"zip"`` or ``"baseline"`` (SAM's point grid is 4x4 then).
    """
    args = [f"--model.{key}={value}" for key, value in TINY_ZIP_SETTINGS.items()]
    args += [f"--model.method={method}", "--model.points_per_side=4"]
    for key, value in checkpoints.items():
        args.append(f"--model.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return args
