"""CLIP Surgery dense features, the 85-template text ensemble and per-class similarity maps (Zip's semantic branch).

Reproduces the behaviour of CLIP Surgery (``xmed-lab/CLIP_Surgery``, ``clip/clip_surgery_model.py`` and
``clip/clip.py``) as Zip uses it (``ChengShiest/Zip-Your-CLIP`` ``zip_utils.py``) on any open_clip
``VisionTransformer``, without modifying the model (``docs/methods/zip.md`` §3):

- The last ``n_surgery`` blocks run two paths. The original path is the unchanged block. The new path starts from the
  input of the first surgery block and adds, in every surgery block, a value-value self-attention (q = k = v, scale
  head_dim^-0.5) computed from that block's *original-path* input, through the block's output projection; the
  feed-forward is skipped on the new path. The CLS token comes from the original path, the patch tokens from the new
  one; ``ln_post`` and ``proj`` are applied to all tokens.
- For inputs other than the training size (Zip: 512×512 → 32×32 grid) the patch positional embeddings are resized
  bilinearly (``align_corners=False``) on every call; the model's parameter is left as it is (CLIP Surgery overwrites
  it in place on the first call, which gives the same values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import Attention, VisionTransformer
from torch import Tensor, nn

__all__ = [
    "SURGERY_TEMPLATES",
    "ClipSurgery",
    "encode_text_ensemble",
    "feature_surgery",
    "image_level_scores",
    "resize_pos_embed",
    "similarity_maps",
    "surgery_encode_image",
]

#: The 85 prompt templates of CLIP Surgery's ``encode_text_with_prompt_ensemble`` (``xmed-lab/CLIP_Surgery``
#: ``clip/clip.py``): the 80 ImageNet templates of CLIP followed by 5 scene prompts, in that order.
# fmt: off
SURGERY_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)
# fmt: on

#: Number of blocks with the dual path in CLIP Surgery's ViTs (``clip_surgery_model.py``: ``for i in range(1, 7)``).
DEFAULT_N_SURGERY = 6
#: Softmax temperature of image-level class scores; 100 is OpenAI CLIP's learned logit scale (exp(4.6052), clamped at
#: 100 in training). Zip's image-level rule is unpublished: this value is an assumption.
DEFAULT_TEMPERATURE = 100.0

Tokenizer = Callable[..., Tensor]


def resize_pos_embed(pos_embed: Tensor, grid_hw: tuple[int, int], old_grid_hw: tuple[int, int] | None = None) -> Tensor:
    """Resize ViT positional embeddings (class token first) to a new patch grid, bilinearly.

    Args:
        pos_embed: ``[1 + h0 * w0, D]`` positional embeddings, class token first.
        grid_hw: New grid ``(h, w)`` in patches.
        old_grid_hw: Grid of ``pos_embed``; ``None`` means square.

    Returns:
        ``[1 + h * w, D]`` in ``pos_embed``'s dtype; ``pos_embed`` itself when the grid is unchanged.
    """
    num_patches, dim = pos_embed.shape[0] - 1, pos_embed.shape[1]
    if old_grid_hw is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch embeddings do not form a square grid; pass old_grid_hw.")
        old_grid_hw = (side, side)
    if tuple(old_grid_hw) == tuple(grid_hw):
        return pos_embed
    patches = pos_embed[1:].float().reshape(1, old_grid_hw[0], old_grid_hw[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid_hw), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patches], dim=0)


def _check_supported(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"CLIP Surgery needs an open_clip VisionTransformer, got {type(visual).__name__}.")
    if visual.attn_pool is not None:
        raise NotImplementedError("CLIP Surgery is not defined for attentional-pooling (CoCa) vision towers.")
    for block in visual.transformer.resblocks:
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise NotImplementedError("CLIP Surgery needs plain packed-qkv multi-head attention.")
        elif isinstance(attn, Attention):
            plain = attn.logit_scale is None and attn.head_scale is None
            plain = plain and all(isinstance(m, nn.Identity) for m in (attn.ln_q, attn.ln_k, attn.ln_inner))
            if not plain:
                raise NotImplementedError("CLIP Surgery is not defined for qk-norm / cosine / head-scaled attention.")
        else:
            raise TypeError(f"Unsupported attention module {type(attn).__name__} in the vision tower.")


def _run_block(block: nn.Module, x: Tensor, batch_first: bool) -> Tensor:
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _value_value_residual(block: nn.Module, x: Tensor) -> Tensor:
    """The new-path residual of one surgery block: v-v self-attention of ``ln_1(x)``, projected; ``x`` is [B, L, D]."""
    attn = block.attn
    batch, length, dim = x.shape
    heads = attn.num_heads
    bias = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * dim :], bias)
    v = v.reshape(batch, length, heads, dim // heads).transpose(1, 2)
    # q = k = v with the default scale 1/sqrt(head_dim), as in CLIP Surgery's Attention for ViTs.
    out = F.scaled_dot_product_attention(v, v, v)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
    if hasattr(block, "ln_attn"):
        out = block.ln_attn(out)
    return block.ls_1(out)


def surgery_encode_image(visual: VisionTransformer, images: Tensor, n_surgery: int = DEFAULT_N_SURGERY) -> Tensor:
    """CLIP Surgery token features of a batch of images (see the module docstring for the dual path).

    Args:
        visual: ``model.visual`` of an open_clip ViT CLIP (left unmodified).
        images: ``[B, 3, H, W]`` normalised images; ``H`` and ``W`` are cut down to multiples of the patch size by the
            patch embedding, as in open_clip.
        n_surgery: Number of final blocks with the dual path (6 in CLIP Surgery and Zip); 0 gives the plain tokens.

    Returns:
        ``[B, 1 + h * w, D]`` projected tokens, class token first, patches in raster order over the ``h × w`` grid
        (``h = H // patch``); the class token equals ``visual(images)`` for token-pooled towers.
    """
    _check_supported(visual)
    blocks = visual.transformer.resblocks
    if not 0 <= n_surgery <= len(blocks):
        raise ValueError(f"n_surgery must be in 0..{len(blocks)}, got {n_surgery}.")
    grid_hw = (images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1])
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_pos_embed(visual.positional_embedding, grid_hw, tuple(visual.grid_size)).to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))

    batch_first = getattr(visual.transformer, "batch_first", True)
    first_surgery = len(blocks) - n_surgery
    for block in blocks[:first_surgery]:
        x = _run_block(block, x, batch_first)
    if n_surgery:
        original, new = x, x
        for block in blocks[first_surgery:]:
            new = new + _value_value_residual(block, original)
            original = _run_block(block, original, batch_first)
        x = torch.cat([original[:, :1], new[:, 1:]], dim=1)
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


class ClipSurgery(nn.Module):
    """An open_clip ViT vision tower that returns CLIP Surgery tokens (:func:`surgery_encode_image`).

    Args:
        visual: ``model.visual`` of an open_clip ViT CLIP; shared, not copied.
        n_surgery: Number of final blocks with the dual path.
    """

    def __init__(self, visual: VisionTransformer, n_surgery: int = DEFAULT_N_SURGERY) -> None:
        super().__init__()
        _check_supported(visual)
        if not 0 <= n_surgery <= len(visual.transformer.resblocks):
            raise ValueError(f"n_surgery must be in 0..{len(visual.transformer.resblocks)}, got {n_surgery}.")
        self.visual = visual
        self.n_surgery = n_surgery

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an input of ``image_hw`` pixels."""
        return image_hw[0] // self.visual.patch_size[0], image_hw[1] // self.visual.patch_size[1]

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised images → ``[B, 1 + h * w, D]`` tokens, class token first."""
        return surgery_encode_image(self.visual, images, self.n_surgery)


@torch.no_grad()
def encode_text_ensemble(
    model: nn.Module,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = SURGERY_TEMPLATES,
    batch_size: int = 1024,
) -> Tensor:
    """Prompt-ensemble text embeddings: each prompt L2-normalised, averaged over templates, renormalised.

    The redundancy embedding of CLIP Surgery and Zip is ``encode_text_ensemble(model, tokenizer, [""])``.
    Computed without gradients (the embeddings are constants of a vocabulary; cache them).

    Args:
        model: An open_clip CLIP model (``encode_text``).
        tokenizer: Its tokenizer (list of strings → ``[N, context_length]`` ids).
        class_names: ``C`` class names; ``""`` is allowed.
        templates: Prompt templates with one ``{}`` each.
        batch_size: Prompts per ``encode_text`` call.

    Returns:
        ``[C, D]`` float32 unit vectors.
    """
    if not class_names or not templates:
        raise ValueError("encode_text_ensemble needs at least one class name and one template.")
    prompts = [template.format(name) for name in class_names for template in templates]
    device = next(model.parameters()).device
    chunks = [
        model.encode_text(tokenizer(prompts[start : start + batch_size]).to(device)).float()
        for start in range(0, len(prompts), batch_size)
    ]
    embeddings = torch.cat(chunks).reshape(len(class_names), len(templates), -1)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    mean = embeddings.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def feature_surgery(
    image_tokens: Tensor,
    text: Tensor,
    redundant: Tensor | None = None,
    norm_dim: int = 1,
    temperature: float = 2.0,
) -> Tensor:
    """Token-class similarities with the redundant component removed (CLIP Surgery's ``clip_feature_surgery``).

    With ``redundant`` (Zip): ``normalize(image_tokens, norm_dim) @ (text - redundant)ᵀ``. Without it, CLIP
    Surgery's class-mean redundancy: with ``s = tokens @ textᵀ`` and ``w = softmax(temperature·s) / mean_c(...)``
    over classes, the result is ``w·s - mean_c(w·s)`` (the closed form of its element-wise feature subtraction).

    Args:
        image_tokens: ``[B, T, D]`` tokens from :func:`surgery_encode_image`.
        text: ``[C, D]`` unit text embeddings.
        redundant: ``[D]`` or ``[1, D]`` redundancy embedding (the ensemble of ``""``), or ``None``.
        norm_dim: Axis of the L2 normalisation of ``image_tokens``: ``1`` (over the token axis) reproduces Zip's
            ``image_features.norm(dim=1)`` quirk; ``-1`` (per token) is CLIP Surgery's own demo.
        temperature: Softmax temperature of the class-mean redundancy (2 in CLIP Surgery); unused with ``redundant``.

    Returns:
        ``[B, T, C]`` similarities.
    """
    tokens = image_tokens / image_tokens.norm(dim=norm_dim, keepdim=True)
    text = text.to(tokens.dtype)
    if redundant is not None:
        return tokens @ (text - redundant.reshape(1, -1).to(tokens.dtype)).t()
    similarity = tokens @ text.t()
    weights = (similarity * temperature).softmax(dim=-1)
    weighted = similarity * (weights / weights.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)


def similarity_maps(
    similarity: Tensor, out_hw: tuple[int, int], grid_hw: tuple[int, int] | None = None, has_cls: bool = True
) -> Tensor:
    """Per-class activation maps at image resolution (CLIP Surgery's ``get_similarity_map``, channels first).

    Drops the class token, min-max normalises each class over the patches, reshapes to the patch grid and upsamples
    bilinearly (``align_corners=False``). A class whose similarities are all equal gets an all-zero map (the original
    divides by zero and gives NaN).

    Args:
        similarity: ``[B, 1 + N, C]`` (or ``[B, N, C]`` with ``has_cls=False``) from :func:`feature_surgery`.
        out_hw: Output ``(H, W)`` in pixels (Zip: the original image size).
        grid_hw: Patch grid ``(h, w)`` with ``h * w = N``; ``None`` means square (as in CLIP Surgery).
        has_cls: Whether token 0 is the class token.

    Returns:
        ``[B, C, H, W]`` float maps in [0, 1].
    """
    patches = similarity[:, 1:] if has_cls else similarity
    batch, num_patches, num_classes = patches.shape
    if grid_hw is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid; pass grid_hw.")
        grid_hw = (side, side)
    if grid_hw[0] * grid_hw[1] != num_patches:
        raise ValueError(f"grid_hw {tuple(grid_hw)} does not hold the {num_patches} patch tokens.")
    low = patches.amin(dim=1, keepdim=True)
    span = patches.amax(dim=1, keepdim=True) - low
    normalised = torch.where(span > 0, (patches - low) / span, torch.zeros_like(patches))
    maps = normalised.reshape(batch, grid_hw[0], grid_hw[1], num_classes).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=tuple(out_hw), mode="bilinear", align_corners=False)


def image_level_scores(
    model: nn.Module, images: Tensor, text_embeddings: Tensor, temperature: float | None = DEFAULT_TEMPERATURE
) -> Tensor:
    """Image-level class probabilities, CLIP zero-shot style: ``softmax(temperature · cos(image, text))`` over classes.

    Zip gates classes with an image-level CLIP score before discovery, but the released code has no such step and
    the paper does not publish its form; this standard zero-shot rule (no redundancy subtraction) is an assumption.

    Args:
        model: An open_clip CLIP model (``encode_image``).
        images: ``[B, 3, S, S]`` images normalised for the model at its training size (224 for ViT-B/16).
        text_embeddings: ``[C, D]`` text embeddings (normalised here).
        temperature: Logit scale; ``None`` uses the model's learned ``logit_scale.exp()``.

    Returns:
        ``[B, C]`` probabilities, each row summing to 1.
    """
    features = model.encode_image(images)
    features = features / features.norm(dim=-1, keepdim=True)
    text = text_embeddings.to(features.dtype)
    text = text / text.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp() if temperature is None else temperature
    return (scale * features @ text.t()).softmax(dim=-1)
