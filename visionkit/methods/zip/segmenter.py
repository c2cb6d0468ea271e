"""The Zip pipeline (``ZipSegmenter``) and the SAM + CLIP baseline it is compared with (``SamClipBaseline``).

Zip (Shi & Yang, ICLR 2024, arXiv 2404.11957; ``docs/methods/zip.md`` §3-§6), per image:

1. semantic clue: CLIP Surgery tokens of the 512×512-squashed image (ViT-B/16, last 6 blocks), similarities with the
   85-template text embeddings minus the empty-class redundancy, one min-max map per class at image size;
2. classification first (optional, on by default): CLIP's image-level probabilities decide which classes are present
   (:func:`~visionkit.methods.zip.postprocess.select_present_classes`; the paper's rule is unpublished);
3. boundary prior: k-means (k = 20, raster init) over CLIP RN50x64 layer3 features of the image resized to short
   side 2048 — one clustering per image, shared by all classes;
4. per present class: activation = map > 0.7·mean(map), resized to the cluster grid (nearest); fragments of the
   examined clusters that are activated (gain > 0.3) and compact (box/area < 3) are kept; 4-connected components of
   at least 100 cells become boxes, mapped to image pixels;
5. SAM refines every box of the image in one batched decoder call; score = sqrt(CLIP class score × SAM predicted IoU);
   optional mask NMS; output masks, boxes, scores and vocabulary labels.

The baseline runs SAM's automatic mask generator and labels each mask with CLIP: the crop of the mask's box (outside
the mask set to the CLIP mean colour) is classified zero-shot with the same text embeddings; score = sqrt(class
probability × SAM predicted IoU). Both return the same per-image dicts and feed the same COCO writer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionkit.methods.zip.discovery import discover_instances, grid_boxes_to_image, select_fragments
from visionkit.methods.zip.postprocess import mask_nms, score_instances, select_present_classes
from visionkit.models.foundation import (
    OPENAI_MEAN,
    ClipResNetTrunk,
    ClipSurgery,
    SamAutomaticMasks,
    SamBoxPrompter,
    clip_preprocess,
    encode_text_ensemble,
    feature_surgery,
    image_level_scores,
    load_clip,
    load_sam,
    preprocess_boundary,
    preprocess_semantic,
    similarity_maps,
)
from visionkit.ops.kmeans import kmeans

__all__ = [
    "FOUNDATION_ARGS",
    "FoundationModels",
    "SamClipBaseline",
    "ZipConfig",
    "ZipSegmenter",
    "build_segmenter",
    "load_foundation_models",
]

Instances = dict[str, Tensor]
#: The arguments of :func:`load_foundation_models` that ``ZipTask`` and ``tools/zip_infer.py`` take under these names.
FOUNDATION_ARGS: tuple[str, ...] = (
    "method",
    "clip_checkpoint",
    "sam_checkpoint",
    "boundary_checkpoint",
    "clip_arch",
    "boundary_arch",
    "sam_variant",
)


@dataclass
class ZipConfig:
    """Hyper-parameters of :class:`ZipSegmenter`.

    Defaults are the released code's (``docs/methods/zip.md`` §7) or, where it has no such step, visionkit's
    documented choices (``docs/methods/zip.md`` §8).

    Attributes:
        semantic_size: Side of the square CLIP Surgery input (released: 512).
        n_surgery: CLIP Surgery blocks (released: last 6 of 12).
        norm_dim: Token normalisation axis in the feature surgery (released: 1, over tokens; -1: per token).
        activation_ratio: Activation mask = map > ratio × mean(map) (released: 0.7).
        boundary_short_side: Short side of the clustering input (released: 2048).
        k: K-means clusters (released: 20).
        kmeans_iters: Iteration cap (released: 100).
        kmeans_rtol: Stopping tolerance (released: 1e-5).
        kmeans_init: ``"raster"`` (released ``zip_utils.py``) or ``"random"`` (the notebook's, seeded here).
        seed: Seed of the ``"random"`` initialisation (one generator per image, so results do not depend on order).
        gain_thresh: Fragment activation fraction to keep (released: 0.3).
        compact_thresh: Fragment box-area / area below which it is kept (released: 3).
        top_k_clusters: Clusters examined per class (released: 20).
        min_area: Smallest instance in grid cells (released: 100).
        classification_first: Gate classes by CLIP's image-level probability (paper; rule is visionkit's).
        class_min_prob: Probability a class needs to count as present.
        max_classes: At most this many classes per image.
        classifier_size: CLIP input side for the image-level scores (ViT-B/16: 224).
        nms_iou: Per-class mask NMS threshold; ``None`` (default): no NMS, as released.
        class_agnostic: Label every instance 0 (one "object" class) and skip the class gate's per-class split.
    """

    semantic_size: int = 512
    n_surgery: int = 6
    norm_dim: int = 1
    activation_ratio: float = 0.7
    boundary_short_side: int = 2048
    k: int = 20
    kmeans_iters: int = 100
    kmeans_rtol: float = 1e-5
    kmeans_init: str = "raster"
    seed: int = 0
    gain_thresh: float = 0.3
    compact_thresh: float = 3.0
    top_k_clusters: int = 20
    min_area: int = 100
    classification_first: bool = True
    class_min_prob: float = 0.05
    max_classes: int = 5
    classifier_size: int = 224
    nms_iou: float | None = None
    class_agnostic: bool = False


def _empty_instances(height: int, width: int, device: torch.device) -> Instances:
    return {
        "masks": torch.zeros(0, height, width, dtype=torch.bool, device=device),
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }


class ZipSegmenter(nn.Module):
    """Annotation-free, open-vocabulary instance segmentation with Zip (see the module docstring).

    Args:
        clip_model: open_clip ViT CLIP for the semantic branch (OpenAI ViT-B/16 by default).
        tokenizer: Its tokenizer.
        boundary: The clustering trunk (:class:`~visionkit.models.foundation.ClipResNetTrunk` of RN50x64).
        prompter: SAM box prompter.
        class_names: The vocabulary, e.g. the 80 COCO names.
        config: Hyper-parameters.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: object,
        boundary: ClipResNetTrunk,
        prompter: SamBoxPrompter,
        class_names: Sequence[str],
        config: ZipConfig | None = None,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("class_names is empty: give the vocabulary to segment")
        self.config = config or ZipConfig()
        self.clip_model = clip_model
        self.surgery = ClipSurgery(clip_model.visual, self.config.n_surgery)
        self.boundary = boundary
        self.prompter = prompter
        self.class_names = list(class_names)
        with torch.no_grad():
            text = encode_text_ensemble(clip_model, tokenizer, self.class_names)
            redundant = encode_text_ensemble(clip_model, tokenizer, [""])
        self.register_buffer("text", text, persistent=False)
        self.register_buffer("redundant", redundant, persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the models and the text embeddings live."""
        return self.text.device

    def class_probabilities(self, image: np.ndarray) -> Tensor:
        """CLIP image-level probabilities over the vocabulary (CLIP's resize + centre crop), (C,)."""
        x = clip_preprocess(image, self.config.classifier_size, resize_mode="center_crop")[None]
        return image_level_scores(self.clip_model, x.to(self.device), self.text)[0]

    def activation_maps(self, image: np.ndarray) -> Tensor:
        """Per-class CLIP Surgery maps at image size, (C, H, W) in [0, 1]."""
        x = preprocess_semantic(image, self.config.semantic_size)[None].to(self.device)
        tokens = self.surgery(x)
        sim = feature_surgery(tokens, self.text, self.redundant, norm_dim=self.config.norm_dim)
        return similarity_maps(sim, tuple(image.shape[:2]), self.surgery.grid_size(tuple(x.shape[-2:])))[0]

    def clusters(self, image: np.ndarray) -> Tensor:
        """K-means labels of the boundary features, (h, w) int64 in 0..k-1."""
        x = preprocess_boundary(image, self.config.boundary_short_side)[None].to(self.device)
        features = self.boundary(x)[0].float()
        cfg = self.config
        generator = None
        if cfg.kmeans_init == "random":
            generator = torch.Generator(device=features.device).manual_seed(cfg.seed)
        labels, _ = kmeans(
            features, k=cfg.k, iters=cfg.kmeans_iters, rtol=cfg.kmeans_rtol, init=cfg.kmeans_init, generator=generator
        )
        return labels

    def discover(self, image: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes before SAM: ``(boxes (K, 4) xyxy image pixels, vocabulary labels (K,), class scores (K,))``."""
        cfg = self.config
        height, width = image.shape[:2]
        probs = self.class_probabilities(image)
        present = (
            select_present_classes(probs, cfg.class_min_prob, cfg.max_classes)
            if cfg.classification_first
            else torch.arange(len(self.class_names), device=probs.device)
        )
        maps = self.activation_maps(image)
        clusters = self.clusters(image)
        grid = tuple(clusters.shape)
        boxes, labels, class_scores = [], [], []
        for c in present.tolist():
            active = maps[c] > cfg.activation_ratio * maps[c].mean()
            active = F.interpolate(active[None, None].float(), size=grid, mode="nearest")[0, 0].bool()
            kept = select_fragments(clusters, active, cfg.gain_thresh, cfg.compact_thresh, cfg.top_k_clusters)
            found = grid_boxes_to_image(discover_instances(kept, cfg.min_area), grid, (height, width))
            boxes.append(found.to(self.device))
            labels.append(torch.full((len(found),), c, dtype=torch.int64, device=self.device))
            class_scores.append(probs[c].expand(len(found)))
        if not boxes:
            return torch.zeros(0, 4, device=self.device), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        return torch.cat(boxes), torch.cat(labels), torch.cat(class_scores)

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Segment ``images`` (``[H, W, 3]`` uint8 RGB arrays).

        Returns:
            One dict per image: ``masks`` (K, H, W) bool, ``boxes`` (K, 4) xyxy pixels (SAM's prompts), ``scores``
            (K,), ``labels`` (K,) vocabulary indices (all 0 when ``class_agnostic``).
        """
        discovered = [self.discover(image) for image in images]
        self.prompter.set_images(list(images))
        results = []
        for index, (image, (boxes, labels, class_scores)) in enumerate(zip(images, discovered, strict=True)):
            if len(boxes) == 0:
                results.append(_empty_instances(*image.shape[:2], self.device))
                continue
            masks, ious, _ = self.prompter.predict_boxes(index, boxes)
            scores = score_instances(class_scores.to(ious.device), ious)
            if self.config.class_agnostic:
                labels = torch.zeros_like(labels)
            out = {"masks": masks, "boxes": boxes.to(masks.device), "scores": scores, "labels": labels.to(masks.device)}
            if self.config.nms_iou is not None:
                keep = mask_nms(masks, scores, self.config.nms_iou, out["labels"])
                out = {key: value[keep] for key, value in out.items()}
            results.append(out)
        return results

    def extra_repr(self) -> str:
        """Vocabulary size and configuration, for ``print(segmenter)``."""
        return f"classes={len(self.class_names)}, config={asdict(self.config)}"


class SamClipBaseline(nn.Module):
    """SAM automatic masks labelled by CLIP zero-shot classification of each mask's box crop.

    Args:
        clip_model: open_clip CLIP model.
        tokenizer: Its tokenizer.
        generator: SAM's automatic mask generator wrapper.
        class_names: The vocabulary.
        classifier_size: CLIP input side for the crops.
        class_agnostic: Label every mask 0.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: object,
        generator: SamAutomaticMasks,
        class_names: Sequence[str],
        classifier_size: int = 224,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.generator = generator
        self.class_names = list(class_names)
        self.classifier_size = classifier_size
        self.class_agnostic = class_agnostic
        with torch.no_grad():
            self.register_buffer(
                "text", encode_text_ensemble(clip_model, tokenizer, self.class_names), persistent=False
            )

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Segment ``images``; same output as :meth:`ZipSegmenter.forward`."""
        results = []
        device = self.text.device
        for image in images:
            found = self.generator.generate(image)
            masks = found.masks.to(device).bool()
            if masks.shape[0] == 0:
                results.append(_empty_instances(*image.shape[:2], device))
                continue
            boxes = found.boxes_xyxy.to(device).float()
            crops = []
            mean = np.array([round(255 * m) for m in OPENAI_MEAN], dtype=np.uint8)  # outside the mask: mean colour
            for mask, box in zip(masks.cpu().numpy(), boxes.round().long().tolist(), strict=True):
                x1, y1, x2, y2 = box
                x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
                crop = np.where(mask[y1:y2, x1:x2, None], image[y1:y2, x1:x2], mean)
                crops.append(clip_preprocess(crop, (self.classifier_size,) * 2, resize_mode="squash"))
            probs = image_level_scores(self.clip_model, torch.stack(crops).to(device), self.text)
            class_scores, labels = probs.max(dim=1)
            ious = found.predicted_iou.to(device).float()
            if self.class_agnostic:
                labels = torch.zeros_like(labels)
            results.append(
                {"masks": masks, "boxes": boxes, "scores": score_instances(class_scores, ious), "labels": labels}
            )
        return results


@dataclass
class FoundationModels:
    """The loaded models a Zip pipeline or the baseline is built from (see :func:`load_foundation_models`).

    Attributes:
        clip_model: The CLIP of the semantic branch and of every class score (OpenAI ViT-B/16), eval mode.
        tokenizer: Its tokenizer.
        sam: SAM (ViT-H by default), eval mode.
        boundary: The clustering trunk (RN50x64 stem to layer3); ``None`` for the baseline.
    """

    clip_model: nn.Module
    tokenizer: Any
    sam: nn.Module
    boundary: ClipResNetTrunk | None = None


def load_foundation_models(
    method: Literal["zip", "baseline"],
    clip_checkpoint: str | os.PathLike[str],
    sam_checkpoint: str | os.PathLike[str],
    boundary_checkpoint: str | os.PathLike[str] | None = None,
    *,
    clip_arch: str | Mapping[str, Any] = "ViT-B-16",
    boundary_arch: str | Mapping[str, Any] = "RN50x64",
    sam_variant: str = "vit_h",
    device: str | torch.device = "cpu",
) -> FoundationModels:
    """Load the models of ``method`` from local checkpoint files (nothing is downloaded), all in fp32 and eval mode.

    Args:
        method: ``"zip"`` (CLIP, the boundary CLIP's trunk, SAM) or ``"baseline"`` (CLIP and SAM).
        clip_checkpoint: OpenAI ViT-B/16 (``ViT-B-16.pt`` or a safetensors / state-dict file).
        sam_checkpoint: SAM, e.g. ``sam_vit_h_4b8939.pth``.
        boundary_checkpoint: OpenAI RN50x64 (``RN50x64.pt``); needed for ``"zip"``.
        clip_arch: open_clip architecture (name or config dict) of ``clip_checkpoint``.
        boundary_arch: open_clip ResNet architecture of ``boundary_checkpoint``.
        sam_variant: SAM variant of ``sam_checkpoint`` (``vit_h``, ``vit_l``, ``vit_b``, ``vit_test``).
        device: Where the models are put.

    Returns:
        The models; only the trunk of the boundary CLIP is kept (its text tower, layer4 and pooling are dropped).

    Raises:
        ValueError: Unknown method, or ``"zip"`` without ``boundary_checkpoint``.
        FileNotFoundError: A checkpoint is missing; the message names it and where to download it.
        CheckpointMismatchError: A file does not fit its architecture (the keys are listed).
    """
    if method not in ("zip", "baseline"):
        raise ValueError(f"method must be 'zip' or 'baseline', got {method!r}")
    if method == "zip" and not boundary_checkpoint:
        raise ValueError("method 'zip' needs boundary_checkpoint (OpenAI RN50x64, e.g. weights/RN50x64.pt)")
    clip_model, tokenizer = load_clip(clip_arch, clip_checkpoint, device=device)
    boundary = None
    if method == "zip":
        boundary_model, _ = load_clip(boundary_arch, boundary_checkpoint, device=device)
        boundary = ClipResNetTrunk(boundary_model.visual).eval()
    sam = load_sam(sam_variant, sam_checkpoint, device=device)
    return FoundationModels(clip_model.eval(), tokenizer, sam, boundary)


def build_segmenter(
    models: FoundationModels,
    class_names: Sequence[str],
    config: ZipConfig | None = None,
    *,
    encoder_batch_size: int = 1,
    automatic_masks: Mapping[str, Any] | None = None,
) -> ZipSegmenter | SamClipBaseline:
    """Zip over ``class_names`` when ``models`` has a boundary trunk, else the SAM + CLIP baseline.

    Args:
        models: What :func:`load_foundation_models` returned.
        class_names: The vocabulary.
        config: Zip's settings; the baseline reads ``classifier_size`` and ``class_agnostic`` from it.
        encoder_batch_size: Images per SAM image-encoder pass (Zip).
        automatic_masks: ``SamAutomaticMasks`` settings of the baseline (``points_per_side``, ``pred_iou_thresh``,
            ...); ``None``: SAM's defaults.

    Returns:
        The segmenter (an ``nn.Module``; SAM itself is held by its prompter / generator, not registered in it).
    """
    config = config or ZipConfig()
    if models.boundary is not None:
        prompter = SamBoxPrompter(models.sam, encoder_batch_size=encoder_batch_size)
        return ZipSegmenter(models.clip_model, models.tokenizer, models.boundary, prompter, class_names, config)
    generator = SamAutomaticMasks(models.sam, **dict(automatic_masks or {}))
    return SamClipBaseline(
        models.clip_model,
        models.tokenizer,
        generator,
        class_names,
        classifier_size=config.classifier_size,
        class_agnostic=config.class_agnostic,
    )
