"""open_clip models from a local checkpoint, Zip's image preprocessing and ModifiedResNet intermediate features.

Zip uses two OpenAI CLIP models (``docs/methods/zip.md`` §3-§4): ViT-B/16 for the semantic branch (CLIP Surgery at
512×512, see :mod:`visionkit.models.foundation.clip_surgery`) and RN50x64 for the boundary branch (stem to layer3,
stride 16, at short side 2048). Both run in fp32. :func:`load_clip` builds any open_clip ``CLIP`` architecture without
downloading anything and fills it from a local file: a ``.safetensors`` or plain state dict (through
:func:`visionkit.weights.load_state_dict`), or OpenAI's original TorchScript ``.pt`` archive (see
:mod:`visionkit.models.foundation.checkpoints` for why reading those is safe).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.modified_resnet import ModifiedResNet
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image
from torch import Tensor, nn

from visionkit.models.foundation.checkpoints import (
    clip_checkpoint_hint,
    is_torchscript_archive,
    read_torchscript_state_dict,
    require_checkpoint,
)
from visionkit.utils.constants import CLIP_MEAN, CLIP_STD
from visionkit.weights import load_state_dict, load_state_dict_into

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ClipResNetTrunk",
    "build_clip",
    "clip_preprocess",
    "load_clip",
    "preprocess_boundary",
    "preprocess_semantic",
]

#: OpenAI CLIP normalisation (``visionkit.utils.CLIP_MEAN`` / ``CLIP_STD``, equal to open_clip's
#: ``OPENAI_DATASET_MEAN`` / ``STD``; Zip's ``H2_ToTensor`` / ``L_ToTensor`` use the same values).
OPENAI_MEAN: tuple[float, float, float] = CLIP_MEAN
OPENAI_STD: tuple[float, float, float] = CLIP_STD
#: Zip's semantic-branch input: a 512×512 bicubic squash (``zip_utils.py`` ``H2_ToTensor``).
SEMANTIC_SIZE = 512
#: Zip's boundary-branch input: short side 2048, bicubic, aspect kept (``zip_utils.py`` ``L_ToTensor``).
BOUNDARY_SHORT_SIDE = 2048

Tokenizer = Callable[..., Tensor]
ImageLike = Image.Image | np.ndarray


def _model_config(arch: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(arch, Mapping):
        return "custom open_clip config", copy.deepcopy(dict(arch))
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"Unknown open_clip architecture {arch!r}; open_clip.list_models() lists the known names.")
    return arch, copy.deepcopy(cfg)


def build_clip(
    arch: str | Mapping[str, Any] = "ViT-B-16", quick_gelu: bool | None = None, pretrained_tag: str = "openai"
) -> tuple[nn.Module, Tokenizer]:
    """Build an open_clip ``CLIP`` / ``CustomTextCLIP`` with random weights and its tokenizer; nothing is downloaded.

    Args:
        arch: An open_clip architecture name (``"ViT-B-16"``, ``"RN50x64"``, ...) or a model config dict as in
            open_clip's ``model_configs/*.json`` (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
            ``quick_gelu``, ``custom_text``); dicts let tests build tiny models.
        quick_gelu: Use QuickGELU. ``None``: the config's ``quick_gelu`` if set, else open_clip's pretrained cfg for
            ``(arch, pretrained_tag)`` (``True`` for every OpenAI checkpoint, which was trained with QuickGELU).
        pretrained_tag: The open_clip tag the weights that will be loaded were trained as.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, fp32, on the CPU; the tokenizer maps a list of strings to
        ``[N, context_length]`` token ids.

    Raises:
        ValueError: Unknown architecture name.
        NotImplementedError: CoCa configs (``multimodal_cfg``) or Hugging Face tokenizers in a config dict.
    """
    name, cfg = _model_config(arch)
    if "multimodal_cfg" in cfg:
        raise NotImplementedError(f"{name}: CoCa models (multimodal_cfg) are not supported by load_clip.")
    if quick_gelu is None:
        if "quick_gelu" in cfg:
            quick_gelu = bool(cfg["quick_gelu"])
        else:
            quick_gelu = bool(isinstance(arch, str) and get_pretrained_cfg(arch, pretrained_tag).get("quick_gelu"))
    cfg["quick_gelu"] = quick_gelu
    text_cfg = cfg.setdefault("text_cfg", {})
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # weights come from the checkpoint, never from the hub
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_class(**cfg).eval()

    if isinstance(arch, str):
        tokenizer = open_clip.get_tokenizer(arch)
    elif "hf_tokenizer_name" in text_cfg:
        raise NotImplementedError("Config dicts with a Hugging Face tokenizer are not supported; pass the name.")
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    return model, tokenizer


def load_clip(
    arch: str | Mapping[str, Any] = "ViT-B-16",
    checkpoint_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    pretrained_tag: str = "openai",
    quick_gelu: bool | None = None,
) -> tuple[nn.Module, Tokenizer]:
    """Build an open_clip architecture (no download) and load a local checkpoint into it, strictly.

    Accepted files: ``.safetensors`` or a plain / wrapped state dict in open_clip's (= OpenAI's) key layout, e.g. the
    Hugging Face hub's ``timm/vit_base_patch16_clip_224.openai`` files; or OpenAI's TorchScript ``.pt`` archive
    (``ViT-B-16.pt``, ``RN50x64.pt``), converted as open_clip's ``build_model_from_openai_state_dict`` does (the
    non-weight entries are dropped, fp16 tensors are cast to the fp32 model).

    Args:
        arch: open_clip architecture name or config dict (see :func:`build_clip`).
        checkpoint_path: The local weight file (or a folder holding exactly one).
        device: Where the model is put.
        pretrained_tag: The open_clip tag of the weights; decides QuickGELU and the download hint.
        quick_gelu: Override of the QuickGELU choice (see :func:`build_clip`).

    Returns:
        ``(model, tokenizer)``, the model in eval mode and fp32.

    Raises:
        ValueError: ``checkpoint_path`` is ``None`` (use :func:`build_clip` for random weights).
        FileNotFoundError: The checkpoint does not exist; the message says where to download it.
        CheckpointMismatchError: The file does not fit the architecture (keys and shapes are listed).
        UnsafeCheckpointError: A pickle that would need arbitrary globals (never unpickled).
    """
    name = arch if isinstance(arch, str) else "custom open_clip config"
    hint = clip_checkpoint_hint(arch, pretrained_tag) if isinstance(arch, str) else "Pass an existing weight file."
    if checkpoint_path is None:
        raise ValueError(f"load_clip({name!r}) needs checkpoint_path; visionkit never downloads weights. {hint}")
    path = require_checkpoint(checkpoint_path, hint)
    model, tokenizer = build_clip(arch, quick_gelu=quick_gelu, pretrained_tag=pretrained_tag)
    state = read_torchscript_state_dict(path) if is_torchscript_archive(path) else load_state_dict(path, hint=hint)
    logit_scale = state.get("logit_scale")
    if logit_scale is not None and logit_scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = logit_scale.reshape(model.logit_scale.shape)
    load_state_dict_into(model, state, path, f"open_clip {name}")
    return model.to(device).eval(), tokenizer


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"Expected an RGB image as an HxWx3 uint8 array, got {array.dtype} {array.shape}.")
    return Image.fromarray(array)


def clip_preprocess(
    image: ImageLike,
    size: int | tuple[int, int],
    resize_mode: Literal["squash", "shortest", "center_crop"] = "squash",
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> Tensor:
    """Resize with PIL bicubic and normalise one image, as OpenAI CLIP / torchvision ``Resize`` do.

    Args:
        image: A PIL image or an ``[H, W, 3]`` uint8 RGB array.
        size: Target size. ``"squash"``: ``(h, w)`` or a side for a square, aspect ratio ignored; ``"shortest"``:
            the short side becomes ``size`` and the long side ``int(size * long / short)`` (torchvision's rule);
            ``"center_crop"``: shortest-side resize then a centred ``size``×``size`` crop (CLIP's standard).
        resize_mode: See ``size``.
        mean: Per-channel mean of the [0, 1] pixel values.
        std: Per-channel standard deviation.

    Returns:
        ``[3, h, w]`` float32 tensor.
    """
    pil = _as_pil(image)
    bicubic = TF.InterpolationMode.BICUBIC
    if resize_mode == "squash":
        target = (size, size) if isinstance(size, int) else tuple(size)
        pil = TF.resize(pil, list(target), interpolation=bicubic)
    elif resize_mode in ("shortest", "center_crop"):
        if not isinstance(size, int):
            raise ValueError(f"resize_mode={resize_mode!r} needs an int size, got {size!r}.")
        pil = TF.resize(pil, size, interpolation=bicubic)
        if resize_mode == "center_crop":
            pil = TF.center_crop(pil, [size, size])
    else:
        raise ValueError(f"resize_mode must be 'squash', 'shortest' or 'center_crop', got {resize_mode!r}.")
    return TF.normalize(TF.to_tensor(pil), list(mean), list(std))


def preprocess_semantic(image: ImageLike, size: int = SEMANTIC_SIZE) -> Tensor:
    """Zip's semantic-branch input: a ``size``×``size`` bicubic squash with OpenAI mean/std (``H2_ToTensor``).

    Args:
        image: A PIL image or an ``[H, W, 3]`` uint8 RGB array.
        size: Square side in pixels (512 in Zip, giving a 32×32 patch grid on ViT-B/16).

    Returns:
        ``[3, size, size]`` float32 tensor.
    """
    return clip_preprocess(image, size, "squash")


def preprocess_boundary(image: ImageLike, short_side: int = BOUNDARY_SHORT_SIDE) -> Tensor:
    """Zip's boundary-branch input: short side ``short_side``, bicubic, aspect kept, OpenAI mean/std (``L_ToTensor``).

    Args:
        image: A PIL image or an ``[H, W, 3]`` uint8 RGB array.
        short_side: Target length of the short side in pixels (2048 in Zip: a 640×480 image becomes 2730×2048).

    Returns:
        ``[3, h, w]`` float32 tensor.
    """
    return clip_preprocess(image, short_side, "shortest")


class ClipResNetTrunk(nn.Module):
    """The stem and the first ``last_stage`` residual stages of an open_clip ``ModifiedResNet``.

    Zip's boundary branch clusters RN50x64 layer3 ("conv4_x") features: stride 16, 2048 channels
    (``docs/methods/zip.md`` §4). The trunk shares (does not copy) the modules of ``visual``; ``layer4`` and the
    attention pool are left out. Submodule names equal ``ModifiedResNet``'s, so its state dict is a subset of the
    visual tower's.

    Args:
        visual: ``model.visual`` of an open_clip ResNet CLIP.
        last_stage: Last residual stage kept, 1-4 (stride ``2 ** (last_stage + 1)``).
    """

    def __init__(self, visual: ModifiedResNet, last_stage: int = 3) -> None:
        super().__init__()
        if not isinstance(visual, ModifiedResNet):
            raise TypeError(f"ClipResNetTrunk needs an open_clip ModifiedResNet, got {type(visual).__name__}.")
        if not 1 <= last_stage <= 4:
            raise ValueError(f"last_stage must be in 1..4, got {last_stage}.")
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool"):
            setattr(self, name, getattr(visual, name))
        self.num_stages = last_stage
        for index in range(1, last_stage + 1):
            setattr(self, f"layer{index}", getattr(visual, f"layer{index}"))
        last_block = getattr(visual, f"layer{last_stage}")[-1]
        #: Channels of the output (2048 for RN50x64 layer3).
        self.out_channels: int = last_block.bn3.num_features
        #: Output stride in pixels (stem 4, then ×2 per stage after the first).
        self.reduction: int = 2 ** (last_stage + 1)

    def forward(self, images: Tensor) -> Tensor:
        """Features of the last kept stage.

        Args:
            images: ``[B, 3, H, W]`` normalised images (cast to the weights' dtype).

        Returns:
            ``[B, out_channels, H / reduction, W / reduction]`` (rounded down at each stride-2 step).
        """
        x = images.to(self.conv1.weight.dtype)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return x
