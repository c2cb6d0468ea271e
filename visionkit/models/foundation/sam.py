"""segment-anything from a local checkpoint, a batched box prompter and the automatic mask generator.

Zip refines every discovered instance box with SAM ViT-H (``docs/methods/zip.md`` §6); its baseline is SAM's automatic
("everything") mode with CLIP-classified masks. ``segment_anything``'s own ``_build_sam`` calls ``torch.load`` without
``weights_only`` or ``map_location``; here the model is built with ``checkpoint=None`` and the file goes through
:func:`visionkit.weights.load_state_dict` (safe, CPU first), loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from visionkit.models.foundation.checkpoints import require_checkpoint, sam_checkpoint_hint
from visionkit.weights import load_state_dict, load_state_dict_into

__all__ = [
    "SAM_VARIANTS",
    "AutomaticMasks",
    "SamAutomaticMasks",
    "SamBoxPrompter",
    "build_sam",
    "load_sam",
    "load_sam_weights",
]


def _build_sam_test() -> Sam:
    """A tiny SAM for CPU tests: 128-pixel input, 2-block 32-wide encoder, 32-wide prompt encoder and decoder."""
    embed, size = 32, 128
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=size,
            patch_size=16,
            embed_dim=embed,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=embed,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed,
            image_embedding_size=(size // 16, size // 16),
            input_image_size=(size, size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=embed, mlp_dim=64, num_heads=2),
            transformer_dim=embed,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


#: Buildable variants: the official sizes (``segment_anything.sam_model_registry``) plus ``vit_test``, a tiny model.
SAM_VARIANTS: dict[str, Callable[[], Sam]] = {
    "vit_h": partial(sam_model_registry["vit_h"], checkpoint=None),
    "vit_l": partial(sam_model_registry["vit_l"], checkpoint=None),
    "vit_b": partial(sam_model_registry["vit_b"], checkpoint=None),
    "vit_test": _build_sam_test,
}


def build_sam(variant: str = "vit_h") -> Sam:
    """Build a SAM with random weights, in eval mode on the CPU; nothing is downloaded.

    Args:
        variant: ``"vit_h"``, ``"vit_l"``, ``"vit_b"`` or ``"vit_test"`` (tiny, for tests).

    Returns:
        The model.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}.")
    return SAM_VARIANTS[variant]().eval()


def load_sam_weights(sam: Sam, checkpoint_path: str | os.PathLike[str], hint: str = "") -> Sam:
    """Load a SAM state dict from a local file into ``sam`` through the safe loader, strictly.

    Args:
        sam: The model to fill.
        checkpoint_path: ``.pth`` (official files are plain state dicts) or ``.safetensors``.
        hint: Where the file can be obtained, for the missing-file error.

    Returns:
        ``sam``, in eval mode.

    Raises:
        FileNotFoundError: The file does not exist (the message carries ``hint``).
        CheckpointMismatchError: Missing, unexpected or mis-shaped keys (all listed).
    """
    path = require_checkpoint(checkpoint_path, hint or sam_checkpoint_hint(""))
    load_state_dict_into(sam, load_state_dict(path, hint=hint or None), path, f"SAM {type(sam.image_encoder).__name__}")
    return sam.eval()


def load_sam(
    variant: str = "vit_h", checkpoint_path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> Sam:
    """Build SAM ``variant`` (no download) and load a local checkpoint into it (works on CPU-only machines).

    Args:
        variant: ``"vit_h"`` (Zip's), ``"vit_l"``, ``"vit_b"`` or ``"vit_test"``.
        checkpoint_path: The local weight file, e.g. ``sam_vit_h_4b8939.pth``.
        device: Where the model is put.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        ValueError: Unknown variant, or no ``checkpoint_path``.
        FileNotFoundError: The file does not exist; the message names the official file and its URL.
        CheckpointMismatchError: The file does not fit the variant.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}.")
    hint = sam_checkpoint_hint(variant)
    if checkpoint_path is None:
        raise ValueError(f"load_sam({variant!r}) needs checkpoint_path; visionkit never downloads weights. {hint}")
    require_checkpoint(checkpoint_path, hint)  # before the (slow) build
    return load_sam_weights(build_sam(variant), checkpoint_path, hint).to(device)


@dataclass
class _ImageEntry:
    features: Tensor  # [C, h, w] image embedding
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SamBoxPrompter:
    """Encode several images per encoder batch, then decode all box prompts of an image in one decoder call.

    The preprocessing is ``SamPredictor.set_image``'s (``ResizeLongestSide`` on the uint8 image, normalise, pad);
    :meth:`predict_boxes` is ``SamPredictor.predict_torch`` with every box in one prompt batch and
    ``multimask_output=False``.

    Args:
        sam: The SAM model (its device is used).
        encoder_batch_size: Images per image-encoder forward pass.
    """

    def __init__(self, sam: Sam, encoder_batch_size: int = 1) -> None:
        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}.")
        self.model = sam
        self.encoder_batch_size = encoder_batch_size
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._entries: list[_ImageEntry] = []

    @property
    def num_images(self) -> int:
        """Number of images currently set."""
        return len(self._entries)

    def original_size(self, image_index: int) -> tuple[int, int]:
        """``(H, W)`` of image ``image_index`` as given to :meth:`set_images`."""
        return self._entries[image_index].original_size

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray]) -> None:
        """Compute the image embeddings of ``images`` (replacing any set before).

        Args:
            images: ``[H, W, 3]`` uint8 RGB arrays, sizes may differ.
        """
        device = self.model.device
        prepared, sizes = [], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"SAM expects HxWx3 uint8 RGB images, got {image.dtype} {image.shape}.")
            resized = torch.as_tensor(self.transform.apply_image(image), device=device).permute(2, 0, 1)
            prepared.append(self.model.preprocess(resized[None].float())[0])
            sizes.append((tuple(image.shape[:2]), tuple(resized.shape[-2:])))
        self._entries = []
        for start in range(0, len(prepared), self.encoder_batch_size):
            features = self.model.image_encoder(torch.stack(prepared[start : start + self.encoder_batch_size]))
            for offset, embedding in enumerate(features):
                original_size, input_size = sizes[start + offset]
                self._entries.append(_ImageEntry(embedding, original_size, input_size))

    @torch.no_grad()
    def predict_boxes(self, image_index: int, boxes_xyxy: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """One mask per box prompt, all boxes of the image in one prompt-encoder + mask-decoder call.

        Args:
            image_index: Index into the images given to :meth:`set_images`.
            boxes_xyxy: ``[K, 4]`` boxes ``(x1, y1, x2, y2)`` in pixels of the original image; ``K`` may be 0.

        Returns:
            ``(masks, iou_scores, low_res_logits)``: ``[K, H, W]`` bool masks at the original size, ``[K]`` SAM
            predicted IoUs, ``[K, 4h, 4w]`` mask logits at the decoder's resolution (256×256 for SAM), all on the
            model's device.
        """
        if not 0 <= image_index < len(self._entries):
            raise IndexError(f"image_index {image_index} out of range: {len(self._entries)} images are set.")
        entry = self._entries[image_index]
        device = self.model.device
        boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32, device=device).reshape(-1, 4)
        if boxes.shape[0] == 0:
            low_h, low_w = self.model.prompt_encoder.mask_input_size
            return (
                torch.zeros((0, *entry.original_size), dtype=torch.bool, device=device),
                torch.zeros(0, device=device),
                torch.zeros((0, low_h, low_w), device=device),
            )
        boxes = self.transform.apply_boxes_torch(boxes, entry.original_size)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=entry.features[None],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks = self.model.postprocess_masks(low_res, entry.input_size, entry.original_size)
        return masks[:, 0] > self.model.mask_threshold, iou[:, 0], low_res[:, 0]


@dataclass
class AutomaticMasks:
    """Masks of SAM's automatic generator for one image, ``M`` of them, sorted as SAM returns them.

    Attributes:
        masks: ``[M, H, W]`` bool.
        boxes_xyxy: ``[M, 4]`` float boxes ``(x1, y1, x2, y2)`` in pixels (SAM's inclusive max coordinates).
        predicted_iou: ``[M]`` SAM predicted IoUs.
        stability_score: ``[M]`` SAM stability scores.
    """

    masks: Tensor
    boxes_xyxy: Tensor
    predicted_iou: Tensor
    stability_score: Tensor


class SamAutomaticMasks:
    """SAM's automatic ("everything") mask generator with its defaults, returning tensors.

    Defaults are ``SamAutomaticMaskGenerator``'s (points_per_side 32, pred_iou_thresh 0.88, stability_score_thresh
    0.95, box_nms_thresh 0.7), chosen by SAM's authors for ViT-H.

    Args:
        sam: The SAM model.
        points_per_side: Point-grid side.
        pred_iou_thresh: Minimum predicted IoU.
        stability_score_thresh: Minimum stability score.
        box_nms_thresh: Box NMS IoU threshold between masks.
        **kwargs: Further ``SamAutomaticMaskGenerator`` arguments (``points_per_batch``, ``crop_n_layers``, ...).
    """

    def __init__(
        self,
        sam: Sam,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        **kwargs: object,
    ) -> None:
        if kwargs.get("output_mode", "binary_mask") != "binary_mask":
            raise ValueError("SamAutomaticMasks returns binary masks; output_mode cannot be changed.")
        self.generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            **kwargs,
        )

    def generate(self, image: np.ndarray) -> AutomaticMasks:
        """Run the generator on one ``[H, W, 3]`` uint8 RGB image.

        Returns:
            The masks, boxes and scores (``M`` may be 0), on the CPU.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM expects an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}.")
        records = self.generator.generate(image)
        height, width = image.shape[:2]
        if not records:
            return AutomaticMasks(
                torch.zeros((0, height, width), dtype=torch.bool), torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0)
            )
        masks = torch.from_numpy(np.stack([r["segmentation"] for r in records])).bool()
        xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        iou = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32)
        stability = torch.tensor([r["stability_score"] for r in records], dtype=torch.float32)
        return AutomaticMasks(masks, boxes, iou, stability)
