"""VMamba v2 (``VSSM``): hierarchical visual state-space backbones, checkpoint-compatible with ``MzeroMiko/VMamba``.

Liu et al., "VMamba: Visual State Space Model" (NeurIPS 2024, arXiv 2401.10166). The v2 models use SS2D with d_state
1 and forward type ``v05_noz`` (:mod:`visionkit.models.backbones.ss2d`), a two-conv patch embedding (stride 4), 3x3
stride-2 conv downsampling between stages, LayerNorm over channels everywhere and a norm → global-average-pool →
linear classifier. OpenUS (arXiv 2511.11510) pretrains ``vmamba_small`` with a mask token (``mask_token=True``).

Registered sizes (configs ``classification/configs/vssm/vmambav2v_tiny_224.yaml``, ``vmambav2_small_224.yaml`` and
``vmambav2_base_224.yaml``; checkpoints of the ``#v2cls`` release, never downloaded by visionkit):

- ``vmamba_tiny`` (``s1l8``): dims 96, depths (2, 2, 8, 2), ssm_ratio 1.0, drop_path 0.2,
  ``vssm1_tiny_0230s_ckpt_epoch_264.pth``;
- ``vmamba_small`` (``s2l15``): dims 96, depths (2, 2, 15, 2), ssm_ratio 2.0, drop_path 0.3,
  ``vssm_small_0229_ckpt_epoch_222.pth``;
- ``vmamba_base`` (``s2l15``): dims 128, depths (2, 2, 15, 2), ssm_ratio 2.0, drop_path 0.6,
  ``vssm_base_0229_ckpt_epoch_237.pth``;
- ``vmamba_test``: dims 16, depths (1, 1, 1, 1), ssm_ratio 2.0, no weights (CPU tests).

Load an official checkpoint with ``visionkit.create_model("vmamba_small", checkpoint_path="vssm_small_0229_...pth")``;
:func:`checkpoint_filter_fn` unwraps ``"model"`` and renames the legacy keys that the official ``VSSM`` renames. With
``mask_token=True`` such an ImageNet checkpoint (which has no ``masked_embed``) loads too, keeping the model's own
zero-initialised mask token; every other key must still match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from visionkit.models.backbones.ss2d import VSSBlock, VSSMHead, VSSMStage, downsample_v3, patch_embed_v2
from visionkit.models.layers.init import init_linear_and_norm
from visionkit.registry import register_model

__all__ = ["VSSM", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


class VSSM(nn.Module):
    """VMamba v2 classification backbone (timm model contract), channel-first throughout.

    Args:
        depths: Blocks per stage.
        dims: Channels of the first stage (doubled per stage) or one value per stage.
        num_classes: Classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: Input channels.
        global_pool: ``"avg"`` or ``""`` (no pooling, only with ``num_classes=0``).
        d_state: SS2D state size N.
        ssm_ratio: SS2D inner expansion.
        dt_rank: SS2D Δ-projection rank or ``"auto"``.
        d_conv: SS2D depthwise kernel size.
        conv_bias: SS2D depthwise conv bias.
        mlp_ratio: MLP expansion in each block.
        drop_path_rate: Stochastic depth, linear from 0 to this value over all blocks.
        mask_token: Create ``masked_embed`` ``(1, dims[0])`` (OpenUS / iBOT masked image modelling, zero-initialised as
            iBOT's), used by ``forward_features(x, mask)``.
        scan_backend: :func:`visionkit.ops.selective_scan` backend of every SS2D.

    Attributes:
        feature_info: ``num_chs`` / ``reduction`` / ``module`` of each stage's output (reductions 4, 8, 16, 32).
        num_features: Channels of the last stage (what ``forward_head`` gets).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 15, 2),
        dims: int | Sequence[int] = 96,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        dims = [int(dims * 2**i) for i in range(num_stages)] if isinstance(dims, int) else [int(d) for d in dims]
        if len(dims) != num_stages:
            raise ValueError(f"VSSM: {len(dims)} dims for {num_stages} stages (dims={dims}, depths={tuple(depths)})")
        self.dims = dims
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.scan_backend = scan_backend

        self.patch_embed = patch_embed_v2(in_chans, dims[0])
        self.masked_embed: nn.Parameter | None = None
        if mask_token:
            self.masked_embed = nn.Parameter(torch.zeros(1, dims[0]))
        total = sum(depths)
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # torch.linspace(0, rate, total)
        ssm_kwargs = dict(
            d_state=d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=dt_rank,
            d_conv=d_conv,
            conv_bias=conv_bias,
            scan_backend=scan_backend,
        )
        self.layers = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            blocks = [VSSBlock(dims[i], rates[first + j], mlp_ratio, **ssm_kwargs) for j in range(depth)]
            downsample = downsample_v3(dims[i], dims[i + 1]) if i < num_stages - 1 else nn.Identity()
            self.layers.append(VSSMStage(blocks, downsample))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}"))
        self.classifier = VSSMHead(self.num_features, num_classes, global_pool)
        self.apply(init_linear_and_norm)  # VMamba's VSSM._init_weights; SS2D parameters keep their own

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: every SS2D ``A_logs`` and ``Ds``, and ``masked_embed``."""
        names = {name for name, _ in self.named_parameters() if name.endswith((".A_logs", ".Ds"))}
        if self.masked_embed is not None:
            names.add("masked_embed")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into layers (timm layer decay): stem, then blocks in depth order."""
        return dict(
            stem=r"^patch_embed|^masked_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),  # after the blocks of its stage
                (r"^classifier\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` without classes)."""
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0: none).

        Args:
            num_classes: New number of classes.
            global_pool: ``"avg"`` or ``""`` (no pooling); ``None`` keeps the current one.
            reset_other: Also drop the classifier's norm (``classifier.norm`` becomes Identity).
        """
        self.num_classes = num_classes
        if reset_other:
            self.classifier.norm = nn.Identity()
        self.classifier.reset(self.num_features, num_classes, global_pool)

    def _embed(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Patch embedding, with ``masked_embed`` written at the masked positions."""
        x = self.patch_embed(x)
        if mask is None:
            return x
        if self.masked_embed is None:
            raise ValueError("VSSM got a mask but was built without a mask token; create it with mask_token=True.")
        mask = _upsample_mask(mask, x.shape)
        return torch.where(mask[:, None], self.masked_embed.to(x.dtype)[:, :, None, None], x)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Stages up to the last one (no final norm).

        Args:
            x: Images, ``(B, in_chans, H, W)``.
            mask: Optional ``(B, h, w)`` bool, True = replace by the mask token; on the patch-embed grid
                ``(ceil(H/4), ceil(W/4))`` or a coarser grid whose sides divide it (upsampled by repetition).

        Returns:
            ``(B, num_features, ~H/32, ~W/32)``.
        """
        x = self._embed(x, mask)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Norm, global average pool and linear layer on ``forward_features``' output.

        Args:
            x: ``(B, num_features, h, w)``.
            pre_logits: Return the pooled features ``(B, num_features)`` instead of logits.

        Returns:
            Logits ``(B, num_classes)`` or pooled features.
        """
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, in_chans, H, W)`` (``mask`` as in :meth:`forward_features`)."""
        return self.forward_head(self.forward_features(x, mask))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        mask: Tensor | None = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (before downsampling) and, optionally, the final features.

        Args:
            x: Images, ``(B, in_chans, H, W)``.
            indices: Stages to return: the last n if an int, all if None, else the listed ones (negative from the end).
            norm: Apply the classifier's norm to the last stage's map (when it is returned).
            stop_early: Stop after the last requested stage.
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list of maps.
            mask: Optional token mask, as in :meth:`forward_features`.

        Returns:
            The maps ``(B, dims[i], ~H / 2^(i+2), ~W / 2^(i+2))``, or ``(final features, maps)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"VSSM.forward_intermediates supports output_fmt='NCHW' only, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self._embed(x, mask)
        for i, stage in enumerate(stages):
            features = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(self.classifier.norm(features) if norm and i == last else features)
            x = stage.downsample(features)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) that the requested intermediates do not need.

        Args:
            indices: Stages to keep outputs of (as in :meth:`forward_intermediates`).
            prune_norm: Drop the classifier's norm too.
            prune_head: Drop the classifier's linear layer.

        Returns:
            The absolute indices of the kept outputs.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        if prune_end:
            # The last kept stage's output is taken before its downsampling, which nothing reads any more; the
            # classifier is sized for the dropped final stage.
            self.layers[-1].downsample = nn.Identity()
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if prune_norm or prune_end:
            self.classifier.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def _upsample_mask(mask: Tensor, feature_shape: torch.Size) -> Tensor:
    """Repeat a ``(B, h, w)`` bool mask up to the ``(B, C, H, W)`` patch-embed grid; errors name both shapes."""
    batch, _, height, width = feature_shape
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")
    if mask.dim() != 3 or mask.shape[0] != batch:
        raise ValueError(f"mask must have shape (B, h, w) with B={batch}, got {tuple(mask.shape)}")
    h, w = mask.shape[1:]
    if h == 0 or w == 0 or height % h or width % w:
        raise ValueError(
            f"mask grid {h}x{w} must divide the patch-embed grid {height}x{width} (input size / 4, rounded up)"
        )
    return mask.repeat_interleave(height // h, dim=1).repeat_interleave(width // w, dim=2)


# Legacy key names of earlier VMamba code, renamed as the official VSSM._load_from_state_dict renames them.
_LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)
# Entries of VMamba's Backbone_VSSM (outnorm{i}) and of OpenUS checkpoints (pixel decoders, masking state) that a
# classification VSSM has no place for.
_EXTRA_KEYS = re.compile(r"^(outnorm\d+\.|decoder2?\.|ema_loss_map$|ema_initialized$|masked_embed$)")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VSSM) -> dict[str, Tensor]:
    """Bring an official VMamba (or OpenUS) state dict to this model's keys.

    Unwraps ``"model"`` (official checkpoints) or ``"state_dict"``, renames legacy keys (``patch_embed.proj`` →
    ``patch_embed.0``, ``patch_embed.norm`` → ``patch_embed.2``, ``blocks.j.ln_1`` → ``blocks.j.norm``,
    ``blocks.j.self_attention`` → ``blocks.j.op``, ``norm`` → ``classifier.norm``, ``head`` → ``classifier.head``)
    and drops the backbone / OpenUS extras that ``model`` lacks (``outnorm{i}.*``, ``decoder.*``, ``decoder2.*``,
    ``ema_loss_map``, ``ema_initialized``, ``masked_embed`` without a mask token), logging what it drops. Every other
    key is passed on, so the loader reports it.

    A model with a mask token loading a checkpoint without one (an ImageNet VMamba checkpoint as the start of OpenUS
    pretraining) keeps its own freshly initialised (zero) ``masked_embed``: it is the one key that may be missing, and
    an info log says so. Any other missing key still fails the strict load.

    Args:
        state_dict: The checkpoint's tensors (possibly wrapped).
        model: The model being loaded.

    Returns:
        The state dict in this model's key layout.
    """
    for container in ("model", "state_dict"):
        if isinstance(state_dict.get(container), Mapping):
            state_dict = state_dict[container]
            break
    own_keys = set(model.state_dict())
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state_dict.items():
        for pattern, replacement in _LEGACY_RENAMES:
            key = re.sub(pattern, replacement, key)
        if key not in own_keys and _EXTRA_KEYS.match(key):
            dropped.append(key)
            continue
        out[key] = value
    if dropped:
        _logger.info("VMamba checkpoint: dropped %d entries the model has no place for: %s", len(dropped), dropped)
    if model.masked_embed is not None and "masked_embed" not in out:
        out["masked_embed"] = model.masked_embed.detach().clone()
        _logger.info("VMamba checkpoint has no masked_embed: the model keeps its freshly initialised mask token.")
    return out


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VSSM:
    return build_model_with_cfg(
        VSSM,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_RELEASE = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    # Evaluation: resize to 256/224 of the crop, bicubic, ImageNet mean/std (official get_val_loader).
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "license": "mit",
        "paper_ids": "arXiv:2401.10166",
        "origin_url": "https://github.com/MzeroMiko/VMamba",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny.in1k": _cfg(url=_RELEASE + "vssm1_tiny_0230s_ckpt_epoch_264.pth"),
        "vmamba_small.in1k": _cfg(url=_RELEASE + "vssm_small_0229_ckpt_epoch_222.pth"),
        "vmamba_base.in1k": _cfg(url=_RELEASE + "vssm_base_0229_ckpt_epoch_237.pth"),
        "vmamba_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T v2 ``s1l8``: 30M parameters, 82.6 % ImageNet-1k top-1 (``vmambav2v_tiny_224.yaml``)."""
    args = dict(dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S v2 ``s2l15``: 50M parameters, 83.6 % top-1 (``vmambav2_small_224.yaml``; OpenUS's backbone)."""
    args = dict(dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B v2 ``s2l15``: 89M parameters, 83.9 % top-1 (``vmambav2_base_224.yaml``)."""
    args = dict(dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_test(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """A tiny VMamba v2 for CPU tests (dims 16-128, one block per stage), no weights."""
    args = dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=2.0, drop_path_rate=0.0)
    return _create_vmamba("vmamba_test", pretrained, **dict(args, **kwargs))
