"""Multi-crop augmentation (DINO / iBOT / OpenUS), its collate function and the pretraining datamodule.

:class:`MultiCrop` turns one image into ``num_global`` global and ``num_local`` local views. Its defaults are OpenUS's
released recipe (``DataAugmentationiBOT`` in ``XZheng0427/OpenUS`` ``main_openus.py``, the DINO/iBOT recipe with the
README's 8 local crops):

==========  ==========================================================================================================
all views   ``RandomResizedCrop`` (bicubic, aspect 3/4..4/3), horizontal flip 0.5, ``ColorJitter(0.4, 0.4, 0.2, 0.1)``
            with p 0.8, grey with p 0.2, ImageNet normalisation
global 1    224 px, scale (0.14, 1), Gaussian blur p 1.0
global 2+   224 px, scale (0.14, 1), Gaussian blur p 0.1, solarize (threshold 128) p 0.2
local       96 px, scale (0.05, 0.4), Gaussian blur p 0.5
==========  ==========================================================================================================

The blur's standard deviation is drawn from ``blur_sigma`` = (0.1, 2.0) px (the released code's Pillow
``GaussianBlur(radius)``, whose radius is the standard deviation); torchvision needs a finite kernel, by default
``2·ceil(3·σ_max) + 1`` = 13 px, which holds the Gaussian out to 3σ at the largest σ.

The views are computed with ``torchvision.transforms.v2`` on uint8 tensors, so each step rounds to 8 bit as the
released Pillow pipeline does. Like every random transform of ``visionkit.data``, they draw from torch's global RNG,
which the loader seeds per worker (:mod:`~visionkit.data.datamodule_base`): ``torch.manual_seed`` fixes the views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torchvision.transforms.v2 as v2
from torch import Tensor

from visionkit.data.datamodule_base import BaseDataModule
from visionkit.data.image_folder import UnlabeledImageFolder
from visionkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MultiCrop", "MultiCropDataModule", "collate_multicrop"]

_SOLARIZE_THRESHOLD = 128  # Pillow's ImageOps.solarize default: values >= 128 are inverted


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_scale(name: str, scale: Sequence[float]) -> None:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) area fractions with 0 < min <= max <= 1, got {tuple(scale)}")


class MultiCrop:
    """Joint transform ``(image uint8 (3, H, W), target) -> (views, target)`` with the multi-crop views.

    ``views`` is a list of ``num_global + num_local`` float32 tensors: ``num_global`` of shape
    ``(3, global_size, global_size)`` (the first with the ``global1`` settings, the others with ``global2``'s), then
    ``num_local`` of shape ``(3, local_size, local_size)``, normalised with ``mean``/``std`` (pixel values in
    ``[0, 1]`` units before normalisation). ``target`` is returned unchanged. Defaults and sources: module docstring.

    Args:
        num_global: Global views (>= 1).
        num_local: Local views (>= 0).
        global_size: Side of the global views in pixels.
        local_size: Side of the local views in pixels.
        global_scale: Area fraction range of the global crops.
        local_scale: Area fraction range of the local crops.
        flip_prob: Horizontal-flip probability.
        jitter_prob: Probability of applying the colour jitter.
        brightness: ``ColorJitter`` brightness.
        contrast: ``ColorJitter`` contrast.
        saturation: ``ColorJitter`` saturation.
        hue: ``ColorJitter`` hue.
        grayscale_prob: Probability of turning a view grey (kept at 3 channels).
        global1_blur_prob: Blur probability of the first global view.
        global2_blur_prob: Blur probability of the other global views.
        local_blur_prob: Blur probability of the local views.
        blur_sigma: Range of the blur's standard deviation in pixels.
        blur_kernel_size: Odd blur kernel side in pixels; ``None``: ``2 * ceil(3 * blur_sigma[1]) + 1``.
        solarize_prob: Solarisation probability of the global views after the first.
        mean: Per-channel mean, ``[0, 1]`` units.
        std: Per-channel standard deviation, ``[0, 1]`` units.

    Raises:
        ValueError: A count, size, scale, probability or kernel size out of range.
    """

    def __init__(
        self,
        num_global: int = 2,
        num_local: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        global1_blur_prob: float = 1.0,
        global2_blur_prob: float = 0.1,
        local_blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        solarize_prob: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global} and {num_local}")
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        for name, value in (
            ("flip_prob", flip_prob), ("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
            ("global1_blur_prob", global1_blur_prob), ("global2_blur_prob", global2_blur_prob),
            ("local_blur_prob", local_blur_prob), ("solarize_prob", solarize_prob),
        ):  # fmt: skip
            _check_probability(name, value)
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {tuple(blur_sigma)}")
        kernel = blur_kernel_size if blur_kernel_size is not None else 2 * math.ceil(3 * blur_sigma[1]) + 1
        used_sizes = [global_size] + ([local_size] if num_local else [])
        # Reflection padding of kernel // 2 pixels needs a view larger than that.
        if kernel < 1 or kernel % 2 == 0 or kernel // 2 >= min(used_sizes):
            raise ValueError(
                f"blur kernel size must be odd, >= 1 and below twice the smallest view ({min(used_sizes)} px), "
                f"got {kernel}"
            )
        self.num_global = num_global
        self.num_local = num_local
        self.global_size = global_size
        self.local_size = local_size
        photometric = [
            v2.RandomHorizontalFlip(flip_prob),
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob),
            v2.RandomGrayscale(grayscale_prob),
        ]
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]

        def view(size: int, scale: Sequence[float], blur_prob: float, solarize: float = 0.0) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC)
            blur = v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur_prob)
            extra = [v2.RandomSolarize(_SOLARIZE_THRESHOLD, p=solarize)] if solarize > 0 else []
            return v2.Compose([crop, *photometric, blur, *extra, *finish])

        self.global1 = view(global_size, global_scale, global1_blur_prob)
        self.global2 = view(global_size, global_scale, global2_blur_prob, solarize_prob)
        self.local = view(local_size, local_scale, local_blur_prob)

    @property
    def num_views(self) -> int:
        """``num_global + num_local``."""
        return self.num_global + self.num_local

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[list[Tensor], dict[str, Any]]:
        """The views of ``image`` (uint8 ``(3, H, W)``) in the order global 1, global 2.., local..; ``target`` as is.

        Raises:
            ValueError: ``image`` is not a uint8 ``(3, H, W)`` tensor.
        """
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"MultiCrop expects a uint8 (3, H, W) image, got {got}")
        views = [self.global1(image)]
        views += [self.global2(image) for _ in range(self.num_global - 1)]
        views += [self.local(image) for _ in range(self.num_local)]
        return views, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_global={self.num_global}, num_local={self.num_local}, "
            f"global_size={self.global_size}, local_size={self.local_size})"
        )


def collate_multicrop(
    batch: Sequence[tuple[Sequence[Tensor], dict[str, Any]]],
) -> tuple[list[Tensor], dict[str, list[Any]]]:
    """Stack the multi-crop views of a batch view by view.

    Args:
        batch: Samples ``(views, target)`` from :class:`MultiCrop`; every sample has the same number of views and
            view ``i`` has the same shape in every sample.

    Returns:
        ``(views, targets)``: ``views[i]`` is ``(B, 3, S_i, S_i)``; ``targets`` maps every target key to the list of
        its per-sample values (e.g. ``image_id``, ``path``, ``dataset``).

    Raises:
        ValueError: An empty batch, or samples whose views differ in number or shape.
    """
    if len(batch) == 0:
        raise ValueError("collate_multicrop: got an empty batch")
    first = batch[0][0]
    for index, (views, _) in enumerate(batch):
        shapes = [tuple(view.shape) for view in views]
        if shapes != [tuple(view.shape) for view in first]:
            raise ValueError(
                f"collate_multicrop: sample {index} has views {shapes} but sample 0 has "
                f"{[tuple(view.shape) for view in first]}"
            )
    stacked = [torch.stack([views[i] for views, _ in batch]) for i in range(len(first))]
    targets = [target for _, target in batch]
    keys = list(dict.fromkeys(key for target in targets for key in target))
    return stacked, {key: [target.get(key) for target in targets] for key in keys}


class MultiCropDataModule(BaseDataModule):
    """Multi-crop views of an unlabelled image collection, for DINO / iBOT / OpenUS pretraining; training only.

    The images are :class:`~visionkit.data.image_folder.UnlabeledImageFolder`'s: with ``image_subdir="images"``
    (default) ``data_root/<dataset>/images/**``, the OpenUS collection layout; with ``None`` every image below
    ``data_root``. Batches come from :func:`collate_multicrop`: ``(views, targets)`` where ``views`` is a list of
    ``num_global + num_local`` tensors ``(B, 3, S, S)`` (global views first) and ``targets`` holds the lists
    ``image_id``, ``path`` and, with ``image_subdir``, ``dataset``. There is no val/test/predict loader.

    ``generate_demo`` writes the synthetic collection (:mod:`visionkit.data.synthetic_corpus`) when ``data_root`` is
    ``<demo root>/pretraining``.

    Args:
        data_root: Collection root (or any image folder with ``image_subdir=None``).
        image_subdir: Image folder inside each dataset folder; ``None`` walks all of ``data_root``.
        skip_incomplete: Skip, with a warning, dataset folders that give no images instead of raising.
        num_global: Global views per image.
        num_local: Local views per image.
        global_size: Global view side in pixels.
        local_size: Local view side in pixels.
        global_scale: Area fraction range of the global crops.
        local_scale: Area fraction range of the local crops.
        flip_prob: Horizontal-flip probability.
        jitter_prob: Colour-jitter probability.
        brightness: Jitter brightness.
        contrast: Jitter contrast.
        saturation: Jitter saturation.
        hue: Jitter hue.
        grayscale_prob: Grey-view probability.
        global1_blur_prob: Blur probability of the first global view.
        global2_blur_prob: Blur probability of the other global views.
        local_blur_prob: Blur probability of the local views.
        blur_sigma: Blur standard deviation range in pixels.
        blur_kernel_size: Blur kernel side; ``None`` derives it from ``blur_sigma``.
        solarize_prob: Solarisation probability of the global views after the first.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        **kwargs: Loader settings of :class:`~visionkit.data.BaseDataModule` (``batch_size``, ``num_workers``,
            ``seed``, ``drop_last``, ``skip_unreadable``, ``generate_demo``, ...).
    """

    collate_fn = staticmethod(collate_multicrop)
    demo_kind: ClassVar[str | None] = "pretraining"
    stage_splits: ClassVar[dict[str, tuple[str, ...]]] = {"fit": ("train",)}
    # Lightning's own hooks: Lightning checks whether they are overridden to decide that there is no such data.
    val_dataloader = pl.LightningDataModule.val_dataloader
    test_dataloader = pl.LightningDataModule.test_dataloader
    predict_dataloader = pl.LightningDataModule.predict_dataloader

    def __init__(
        self,
        data_root: str,
        image_subdir: str | None = "images",
        skip_incomplete: bool = False,
        num_global: int = 2,
        num_local: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        global1_blur_prob: float = 1.0,
        global2_blur_prob: float = 0.1,
        local_blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        solarize_prob: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        data_root = str(data_root)  # saved hyper-parameters must stay plain values (no Path) for weights-only loading
        super().__init__(**kwargs)
        self.root = data_root
        # Built here so that a bad setting fails when the config is read, not when the first batch is drawn.
        self.multicrop = MultiCrop(
            num_global, num_local, global_size, local_size, global_scale, local_scale, flip_prob, jitter_prob,
            brightness, contrast, saturation, hue, grayscale_prob, global1_blur_prob, global2_blur_prob,
            local_blur_prob, blur_sigma, blur_kernel_size, solarize_prob, mean, std,
        )  # fmt: skip

    def build_dataset(self, split: str) -> UnlabeledImageFolder:
        """The collection with the multi-crop transform (only ``train`` exists)."""
        hp = self.hparams
        return UnlabeledImageFolder(
            self.root, transforms=self.multicrop, image_subdir=hp.image_subdir, skip_incomplete=hp.skip_incomplete
        )

    @property
    def dataset_sizes(self) -> dict[str, int]:
        """Images per dataset folder of the training collection (after ``setup("fit")``)."""
        return self.dataset("train").dataset_sizes
