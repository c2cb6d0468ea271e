"""Save a PNG of images with the teacher attention of an OpenUS model and the self-adaptive mask it gives them.

Usage::

    python tools/openus_masks.py --ckpt outputs/openus/pretrain_synthetic/checkpoints/last.ckpt \
        --images data/demo/pretraining --out masks.png [--epoch E] [--epochs E_total] [--size 224] \
        [--max-images 8] [--seed 0]
    python tools/openus_masks.py --config configs/openus/pretrain_synthetic.yaml --images a.png b.png --out m.png

One row per image (shortest side resized to ``--size``, centre crop, ImageNet normalisation):

1. the image;
2. the attended score ``A_t = attention.mean(dim=1)`` of the teacher's token attention map (how much each token is
   attended, min–max scaled per image, viridis: dark = little, yellow = much), one block per 32-px token;
3. the adaptive mask at epoch ``--epoch`` of ``--epochs``: masked tokens greyed and hatched, the ``top_fraction_at``
   share chosen by score outlined in orange, the random fill outlined in cyan. The mask is the one of a first
   training iteration: the score is the teacher attention alone (no reconstruction importance of a previous batch
   exists), so ``alpha_at`` weighs nothing and is only reported.

``--ckpt`` loads a Lightning checkpoint of ``OpenUSPretrain`` (``weights_only`` loading); ``--config`` alone builds
the untrained model its ``model.init_args`` describe (randomly initialised unless it names initial weights), which
the title says. ``--epoch`` defaults to the checkpoint's epoch (0 without one); ``--epochs`` to ``trainer.max_epochs``
of ``--config`` or of the run's saved ``logs/version_*/config.yaml`` next to the checkpoint folder (needed only for
an epoch after 0). The masks are drawn from one generator seeded with ``--seed``, image after image in path order.

Exit status: 0 and the output path printed; 2 on bad input, with a one-line error naming the file (a missing or
unusable checkpoint or config, an unreadable image, no images, a ``--size`` that is not a multiple of 32).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from visionkit.data.image_io import IMAGE_EXTENSIONS, read_image
from visionkit.data.transforms import CenterCrop, Compose, Normalize, ResizeShortestSide
from visionkit.methods.openus import OpenUSPretrain
from visionkit.methods.openus.masking import adaptive_mask, alpha_at, masking_score, top_fraction_at
from visionkit.tasks.callbacks import checkpoint_problem
from visionkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from visionkit.viz import heatmap_overlay, image_grid, patch_mask_overlay, save_png, with_caption

#: The last VMamba stage has a 32-px stride: the token grid of a ``--size`` image is ``size/32 × size/32``.
STRIDE = 32
TOP_COLOR = (255, 140, 0)
RANDOM_COLOR = (0, 200, 255)
#: Progress bars from this many images on.
PROGRESS_FROM = 8


class InputError(Exception):
    """Bad input (a file that is missing, unreadable or of the wrong kind): one line for the user, exit status 2."""


class LoadedModel(NamedTuple):
    """A model to visualise and what the figure says about it.

    Attributes:
        model: The OpenUS task (eval mode).
        epoch: Epoch stored in the checkpoint, ``None`` without one.
        max_epochs: ``trainer.max_epochs`` of the run's config, ``None`` if unknown.
        description: What the model is, for the title.
    """

    model: OpenUSPretrain
    epoch: int | None
    max_epochs: int | None
    description: str


class TokenMasks(NamedTuple):
    """The attention score and the adaptive mask of a batch of images, on the last-stage token grid ``(h, w)``.

    Attributes:
        attended: ``(N, h, w)`` float, ``A_t`` min–max scaled per image to ``[0, 1]`` (the masking score).
        masked: ``(N, h, w)`` bool, ``True`` = masked; ``ceil(mask_ratio·h·w)`` per image.
        top: ``(N, h, w)`` bool, the masked tokens chosen by score (a subset of ``masked``; the rest is random).
        alpha: Teacher weight ``alpha_at(epoch)`` (no effect without reconstruction importance).
        top_fraction: Share ``top_fraction_at(epoch)`` of all tokens taken by score.
    """

    attended: Tensor
    masked: Tensor
    top: Tensor
    alpha: float
    top_fraction: float


def _size(value: str) -> int:
    size = int(value)
    if size <= 0 or size % STRIDE:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of {STRIDE} (the VMamba token stride), got {size}; e.g. {STRIDE * 7}"
        )
    return size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="Lightning checkpoint of OpenUSPretrain")
    parser.add_argument("--config", type=Path, help="training config (untrained model without --ckpt; max_epochs)")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--epoch", type=int, help="epoch of the mask schedules (default: the checkpoint's, or 0)")
    parser.add_argument("--epochs", type=int, help="total epochs of the run (default: max_epochs of its config)")
    parser.add_argument("--size", type=_size, default=224, help="image side in pixels, a multiple of 32")
    parser.add_argument("--max-images", type=int, default=8, help="at most this many images (rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask fill (and of a random init)")
    parser.add_argument("--device", default="cpu")
    return parser


# ---------------------------------------------------------------------------------------------------------- inputs


def image_paths(inputs: Sequence[str | Path], max_images: int | None = None) -> list[Path]:
    """The image files named or contained (not recursively, sorted) in ``inputs``, in order, at most ``max_images``.

    Raises:
        InputError: A path that does not exist, or no image at all.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.is_file():
            paths.append(item)
        else:
            raise InputError(f"{item}: no such image file or folder")
    if not paths:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return paths[:max_images] if max_images else paths


def prepare_image(path: str | Path, size: int) -> tuple[Tensor, Tensor]:
    """Read an image, resize its shortest side to ``size`` and crop the centre square.

    Args:
        path: Image file.
        size: Output side in pixels.

    Returns:
        ``(shown, normalized)``: ``(3, size, size)`` uint8 RGB, and the same as float32 normalised with the ImageNet
        mean / std (the model's input).

    Raises:
        InputError: The file is missing or cannot be decoded (the message names it).
    """
    try:
        image = read_image(path)
    except OSError as error:  # FileNotFoundError, ImageReadError: both name the file
        raise InputError(str(error) if str(path) in str(error) else f"{path}: {error}") from error
    shown, _ = Compose([ResizeShortestSide(size), CenterCrop(size)])(image, {})
    normalized, _ = Normalize(IMAGENET_MEAN, IMAGENET_STD)(shown, {})
    return shown, normalized


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _max_epochs_of(config: dict[str, Any]) -> int | None:
    trainer = config.get("trainer") or {}
    value = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def read_config(path: Path) -> dict[str, Any]:
    """A training YAML as a dict.

    Raises:
        InputError: Missing, not YAML, or not a mapping.
    """
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        reason = "the file does not exist" if isinstance(error, FileNotFoundError) else str(error).splitlines()[0]
        raise InputError(f"config {path}: {reason}") from error
    if not isinstance(config, dict):
        raise InputError(f"config {path}: not a YAML mapping")
    return config


def _run_max_epochs(checkpoint: Path) -> int | None:
    """``trainer.max_epochs`` of the newest config the CLI saved for the run (``<root>/logs/version_*/config.yaml``)."""
    saved = sorted(checkpoint.parent.parent.glob("logs/version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    for path in reversed(saved):
        try:
            return _max_epochs_of(read_config(path))
        except InputError:
            continue
    return None


def load_model(ckpt: Path | None, config: Path | None, seed: int = 0, device: str = "cpu") -> LoadedModel:
    """The OpenUS model of a checkpoint, or the untrained one of a config.

    Args:
        ckpt: Lightning checkpoint (its hyper-parameters build the model), or ``None``.
        config: Training YAML: builds the model when there is no ``ckpt`` and gives ``trainer.max_epochs``.
        seed: Seed of the random initialisation (without ``ckpt``).
        device: Where the model runs.

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        InputError: Neither file given, a missing or unusable file, or not an OpenUSPretrain.
    """
    settings = read_config(config) if config is not None else None
    max_epochs = _max_epochs_of(settings) if settings is not None else None
    if ckpt is not None:
        if not ckpt.is_file():
            raise InputError(f"checkpoint {ckpt}: the file does not exist")
        try:  # mmap: only the small entries are read here; load_from_checkpoint reads the weights
            stored = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # damaged, truncated, not a checkpoint, or carrying code: checkpoint_problem says
            raise InputError(f"checkpoint {ckpt}: {checkpoint_problem(ckpt) or _first_line(error)}") from error
        if not isinstance(stored, dict) or "state_dict" not in stored:
            raise InputError(f"checkpoint {ckpt}: not a Lightning checkpoint (no 'state_dict' entry)")
        try:
            model = OpenUSPretrain.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        except (TypeError, KeyError, ValueError, RuntimeError) as error:  # another task's hparams or weights
            raise InputError(f"checkpoint {ckpt}: not an OpenUSPretrain checkpoint ({_first_line(error)})") from error
        epoch = int(stored.get("epoch", 0))
        step = stored.get("global_step")
        description = f"{ckpt} (epoch {epoch}" + (f", step {step})" if step is not None else ")")
        if max_epochs is None:
            max_epochs = _run_max_epochs(ckpt)
    elif settings is not None:
        model_config = settings.get("model") or {}
        class_path = str(model_config.get("class_path", "")) if isinstance(model_config, dict) else ""
        if class_path.rsplit(".", 1)[-1] != "OpenUSPretrain":
            raise InputError(f"config {config}: model.class_path is {class_path or 'missing'}, not OpenUSPretrain")
        init_args = dict(model_config.get("init_args") or {})
        torch.manual_seed(seed)
        try:
            model = OpenUSPretrain(**init_args)
        except (TypeError, ValueError, OSError) as error:
            raise InputError(f"config {config}: cannot build OpenUSPretrain ({_first_line(error)})") from error
        epoch = None
        start = init_args.get("checkpoint_path") or ("registered weights" if init_args.get("pretrained") else None)
        source = f"initial weights from {start}" if start else f"randomly initialised, seed {seed}"
        description = f"UNTRAINED model of {config} ({source})"
    else:
        raise InputError("give --ckpt (a trained model) or --config (an untrained one)")
    return LoadedModel(model.to(device).eval(), epoch, max_epochs, description)


# ---------------------------------------------------------------------------------------------------------- masks


def mask_schedule(hparams: Any, epoch: int, epochs: int) -> tuple[float, float]:
    """``(alpha, top_fraction)`` of the model's schedules at ``epoch`` of ``epochs`` (as ``adaptive_global_mask``).

    Raises:
        ValueError: ``epoch`` outside ``[0, epochs]``.
    """
    start = hparams.top_fraction_start
    if start is None:
        start = 0.1 if hparams.student_feedback else 0.001
    alpha = alpha_at(epoch, epochs, hparams.alpha_start, hparams.alpha_end, schedule=hparams.alpha_schedule)
    return alpha, top_fraction_at(epoch, epochs, start, hparams.top_fraction_end)


def _num_top(length: int, top_fraction: float) -> int:
    # adaptive_mask's count: floor of the decimal product (rounded to 1e-9 before flooring).
    return math.floor(round(length * top_fraction, 9))


@torch.no_grad()
def compute_masks(
    model: OpenUSPretrain, images: Tensor, epoch: int, epochs: int, generator: torch.Generator
) -> TokenMasks:
    """Teacher attention and adaptive mask of normalised images, attention only (a first training iteration).

    Args:
        model: The OpenUS task (its teacher and mask hyper-parameters are used).
        images: ``(N, 3, H, W)`` ImageNet-normalised images, ``H`` and ``W`` multiples of 32.
        epoch: Epoch of the schedules.
        epochs: Total epochs of the run.
        generator: Source of the random fill (consumed).

    Returns:
        The :class:`TokenMasks` on the CPU.
    """
    hp = model.hparams
    alpha, top_fraction = mask_schedule(hp, epoch, epochs)
    attention, output = model.teacher_attention(images)
    grid = tuple(output.feature_map.shape[-2:])
    score = masking_score(attention, None, alpha, convention=hp.alpha_convention)  # (N, L): min-max of A_t
    masked = adaptive_mask(score, hp.mask_ratio, top_fraction, generator=generator)
    num_masked = int(masked[0].sum()) if masked.shape[0] else 0
    # The same topk call as adaptive_mask's on the same scores, so these are exactly its score-chosen tokens.
    top = torch.zeros_like(masked)
    top.scatter_(1, score.topk(min(_num_top(score.shape[1], top_fraction), num_masked), dim=1).indices, True)
    return TokenMasks(
        score.view(-1, *grid).cpu(), masked.view(-1, *grid).cpu(), top.view(-1, *grid).cpu(), alpha, top_fraction
    )


# ---------------------------------------------------------------------------------------------------------- figure


def render_row(shown: Tensor, masks: TokenMasks, index: int, name: str) -> list[Image.Image]:
    """The three panels of one image: the image, its attention heat map, its mask (each captioned below)."""
    masked, top = masks.masked[index], masks.top[index]
    num_top, num_masked = int(top.sum()), int(masked.sum())
    random_fill = masked & ~top
    return [
        with_caption(Image.fromarray(shown.permute(1, 2, 0).numpy()), name, position="bottom", max_lines=1),
        with_caption(heatmap_overlay(shown, masks.attended[index], alpha=0.75), "A_t", position="bottom", max_lines=1),
        with_caption(
            patch_mask_overlay(shown, masked, outlines=[(random_fill, RANDOM_COLOR, 1), (top, TOP_COLOR, 3)]),
            f"{num_masked}/{masked.numel()} masked: {num_top} top + {num_masked - num_top} random",
            position="bottom",
            max_lines=1,
        ),
    ]


def figure_title(description: str, model: OpenUSPretrain, masks: TokenMasks, epoch: int, epochs: int) -> str:
    """The figure's title: model, schedule values, what the score is and how to read the columns."""
    hp = model.hparams
    grid = tuple(masks.masked.shape[-2:])
    length = grid[0] * grid[1]
    num_masked = int(masks.masked[0].sum()) if len(masks.masked) else 0
    return (
        f"OpenUS adaptive masks - {description}\n"
        f"epoch {epoch} of {epochs}: mask_ratio {hp.mask_ratio} -> {num_masked} of {length} tokens "
        f"({grid[0]}x{grid[1]}) masked; top_fraction {masks.top_fraction:.3f} -> "
        f"{min(_num_top(length, masks.top_fraction), num_masked)} by score, the rest at random\n"
        f"score = teacher attention only, as in the first iteration (no reconstruction importance), so alpha "
        f"{masks.alpha:.3f} has no effect; attention {hp.attention_mode}, stage {hp.attention_stage}, "
        f"block {hp.attention_block}\n"
        "columns: image | A_t = attention mean over queries, min-max per image (dark: little, yellow: much) | "
        "mask: grey hatched = masked, orange = top-scored, cyan = random fill"
    )


# ---------------------------------------------------------------------------------------------------------- main


def _epochs(args: argparse.Namespace, loaded: LoadedModel) -> tuple[int, int]:
    epoch = args.epoch if args.epoch is not None else (loaded.epoch or 0)
    epochs = args.epochs if args.epochs is not None else loaded.max_epochs
    if epochs is None:
        if epoch != 0:
            raise InputError(f"the run's total epochs are unknown: pass --epochs (needed for epoch {epoch})")
        epochs = 1  # the schedules' epoch-0 values do not depend on the total
    if epochs < 1 or not 0 <= epoch <= epochs:
        raise InputError(f"need --epochs >= 1 and --epoch in [0, epochs], got epoch {epoch} of {epochs}")
    return epoch, epochs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = image_paths(args.images, args.max_images)
        prepared = [prepare_image(path, args.size) for path in paths]  # bad images fail before the model loads
        loaded = load_model(args.ckpt, args.config, seed=args.seed, device=args.device)
        epoch, epochs = _epochs(args, loaded)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    panels: list[Image.Image] = []
    results: list[TokenMasks] = []
    progress = tqdm(paths, desc="masks", unit="img", disable=len(paths) < PROGRESS_FROM)
    for path, (shown, normalized) in zip(progress, prepared, strict=True):
        masks = compute_masks(loaded.model, normalized[None].to(args.device), epoch, epochs, generator)
        results.append(masks)
        panels.extend(render_row(shown, masks, 0, path.name))
    title = figure_title(loaded.description, loaded.model, results[0], epoch, epochs)
    figure = with_caption(image_grid(panels, columns=3), title, position="top")
    print(save_png(figure, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
