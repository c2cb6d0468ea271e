"""Mod-Squad's multi-task mixture-of-experts ViT (``ModSquadViT``): per-task routers over experts shared by all tasks.

Chen et al., "Mod-Squad" (CVPR 2023, arXiv 2212.08066); released code ``UMass-Foundation-Model/Mod-Squad`` at
``1d17e81``: ``models_mt.py`` (``MTVisionTransformerMoETaskGating``, ``mtvit_taskgate_att_mlp_base_MI_twice``) and
``models_moe.py`` (``MoEnhanceTaskBlock``, ``MoETaskAttention``, ``Attention``). ``docs/methods/modsquad.md``
("Model") has the configurations, parameter counts and deviations. Pre-norm blocks alternate ("twice"): even blocks
hold a mixture of attention heads (``MoAttention``, ``k = num_heads`` of ``attn_experts``) and a dense MLP, odd blocks
a dense attention and an MoE-MLP (``TaskMoE``, top ``mlp_k`` of ``mlp_experts``). As released, the dense attention
gets ``head_dim`` too: inner width ``num_heads · head_dim`` (ViT-B: 1536, twice ViT-B's). Task ``t``'s
``task_embedding[:, t]`` is added to the tokens before every block.

One task per call (a Python int, as released): ``model(x, task="coco")``, or ``with model.task("coco"):`` around code
that calls the model without one (Mask R-CNN, the feature pyramid, timm's feature wrappers); a one-task model (e.g.
after ``extract_task_model``) uses its task by default. ``visionkit.methods.modsquad.attach_routing_stats(model)``
adds the routing statistics and the mutual-information loss; the model knows nothing of them.

State-dict keys are the release's, so a released checkpoint loads unchanged apart from its Taskonomy ``task_heads``
(:func:`checkpoint_filter_fn`). Upcycling from a dense timm ViT: :mod:`~visionkit.models.backbones.modsquad_upcycle`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionkit.models.backbones.modsquad_upcycle import UpcycleReport, load_dense_vit, unwrap_state_dict
from visionkit.models.layers import MoAttention, TaskMoE
from visionkit.models.layers.init import init_linear_and_norm
from visionkit.ops.moe import MoEBackend
from visionkit.registry import register_model

__all__ = ["ModSquadBlock", "ModSquadViT", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


class ModSquadBlock(nn.Module):
    """Pre-norm block ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; MoE sub-layers get the task.

    Args:
        dim: Token width ``D``.
        attn: ``MoAttention`` or a dense attention (timm ``Attention``).
        mlp: ``TaskMoE`` or a dense MLP (timm ``Mlp``).
        drop_path: Stochastic-depth rate.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.moe_attn, self.moe_mlp = isinstance(attn, MoAttention), isinstance(mlp, TaskMoE)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp

    def forward(self, x: Tensor, task: int) -> Tensor:
        """``(B, L, D)`` tokens through the block with task ``task``'s routers."""
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, task) if self.moe_attn else self.attn(y))
        y = self.norm2(x)
        return x + self.drop_path(self.mlp(y, task) if self.moe_mlp else self.mlp(y))


class ModSquadViT(nn.Module):
    """Multi-task MoE ViT of Mod-Squad (timm model contract; see the module docstring).

    Args:
        img_size: Input size the position embedding is built for.
        patch_size: Patch size (16 for the feature pyramid of detection / segmentation).
        in_chans: Input channels.
        num_classes: Classifier outputs (0: ``forward`` returns pooled features).
        global_pool: ``"avg"`` (mean of the patch tokens, the release's classification path), ``"token"`` or ``""``.
        embed_dim: Token width ``D``.
        depth: Blocks.
        num_heads: Heads of the dense attention and ``k`` of the mixture of attention heads.
        head_dim: Per-head width of both attentions (released: ``2 · D / num_heads``).
        mlp_ratio: Dense MLP hidden width ``D · mlp_ratio``.
        attn_experts: Attention experts per MoA layer (a list: one count per MoA layer, as extraction leaves them).
        mlp_experts: Experts per MoE-MLP layer (or one count per MoE-MLP layer).
        mlp_k: Experts per token in the MoE-MLP.
        mlp_expert_hidden: Hidden width of one MLP expert (default ``D · mlp_ratio / mlp_k``).
        moe_pattern: ``"alternate"`` (released "twice": MoA in even blocks, MoE-MLP in odd) or ``"all"``.
        task_names: One name per task (router, task-embedding row).
        qkv_bias: Bias of ``qkv`` / ``kv_proj``.
        noisy_gating: Noisy routers (off in the released MI configs).
        drop_rate: Dropout after the position embedding, in the MLPs and after the attention projections.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth, linear from 0 to this value over the blocks.
        fc_norm: Norm after pooling instead of before (timm); ``None``: for ``global_pool="avg"`` (the release's
            ``fc_norm`` for classification).
        dynamic_img_size: Interpolate the position embedding to every input (timm); set by the feature pyramid.
        dynamic_img_pad: Pad inputs to a multiple of the patch size (with ``dynamic_img_size``).
        zero_init_routers: Zero the routers after init (``TaskMoE``'s own init); the release re-initialises them
            with the ViT's truncated normal, which is the default.
        moe_backend: Dispatch backend of the experts.
        renormalize_gates: Renormalise the top-k gates (a deviation).
        removed_router_rows: One count per MoE layer (block order, attention before MLP): the frozen router rows of
            experts removed by ``extract_task_model(keep_softmax_mass=True)`` (``removed_router``); 0 or ``None``: none.

    Attributes:
        task_names: ``list[str]``, one name per task (kept in step with ``num_tasks`` by extraction / ``add_task``).
        num_tasks: Number of tasks.
        task_embedding: ``(1, num_tasks, D)`` parameter.
        feature_info: One entry per block: ``num_chs`` ``D``, ``reduction`` ``patch_size``, ``module``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        head_dim: int = 128,
        mlp_ratio: float = 4.0,
        attn_experts: int | Sequence[int] = 24,
        mlp_experts: int | Sequence[int] = 16,
        mlp_k: int = 4,
        mlp_expert_hidden: int | None = None,
        moe_pattern: str = "alternate",
        task_names: Sequence[str] = ("cls",),
        qkv_bias: bool = True,
        noisy_gating: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        zero_init_routers: bool = False,
        moe_backend: MoEBackend = "auto",
        renormalize_gates: bool = False,
        removed_router_rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        names = [str(n) for n in task_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task_names must be non-empty and unique, got {list(task_names)}")
        if global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be 'avg', 'token' or '', got {global_pool!r}")
        if moe_pattern not in ("alternate", "all"):
            raise ValueError(f"moe_pattern must be 'alternate' or 'all', got {moe_pattern!r}")
        self.task_names, self.num_tasks = names, len(names)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads, self.head_dim, self.moe_pattern = num_heads, head_dim, moe_pattern
        self.num_prefix_tokens, self.has_class_token = 1, True
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self._task_stack: list[int | str] = []

        embed_args: dict[str, Any] = {}
        if dynamic_img_size:  # timm's ViT: NHWC tokens, so that _pos_embed sees the grid
            embed_args.update(strict_img_size=False, output_fmt="NHWC")
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, dynamic_img_pad=dynamic_img_pad, **embed_args
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.task_embedding = nn.Parameter(torch.randn(1, self.num_tasks, embed_dim))  # released: N(0, 1)
        self.pos_drop = nn.Dropout(drop_rate)

        mlp_hidden = int(embed_dim * mlp_ratio)
        expert_hidden = mlp_expert_hidden or mlp_hidden // mlp_k
        moe = dict(num_tasks=self.num_tasks, noisy_gating=noisy_gating, backend=moe_backend,
                   renormalize_gates=renormalize_gates)  # fmt: skip
        num_attn = sum(1 for i in range(depth) if moe_pattern == "all" or i % 2 == 0)
        num_mlp = sum(1 for i in range(depth) if moe_pattern == "all" or i % 2 == 1)
        attn_counts = _per_layer(attn_experts, num_attn, "attn_experts")
        mlp_counts = _per_layer(mlp_experts, num_mlp, "mlp_experts")
        blocks = []
        for i in range(depth):
            if moe_pattern == "all" or i % 2 == 0:
                attn: nn.Module = MoAttention(embed_dim, attn_counts.pop(0), num_heads, head_dim, qkv_bias=qkv_bias,
                                              attn_drop=attn_drop_rate, proj_drop=drop_rate, **moe)  # fmt: skip
            else:  # released quirk: the dense attention is num_heads × head_dim wide too
                attn = Attention(embed_dim, num_heads, attn_head_dim=head_dim, qkv_bias=qkv_bias,
                                 attn_drop=attn_drop_rate, proj_drop=drop_rate)  # fmt: skip
            if moe_pattern == "all" or i % 2 == 1:
                mlp: nn.Module = TaskMoE(embed_dim, expert_hidden, mlp_counts.pop(0), mlp_k, bias=True, **moe)
            else:
                mlp = Mlp(embed_dim, mlp_hidden, drop=drop_rate)
            # linear stochastic-depth schedule, computed in Python (torch.linspace fails on the meta device)
            blocks.append(ModSquadBlock(embed_dim, attn, mlp, drop_path_rate * i / max(depth - 1, 1)))
        self.blocks = nn.ModuleList(blocks)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        if removed_router_rows is not None:
            self._add_removed_routers(list(removed_router_rows))

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        # The release's timm ViT init over every Linear (routers and kv_proj included); experts keep their own.
        self.apply(init_linear_and_norm)
        if zero_init_routers:
            for name, param in self.named_parameters():
                if ".f_gate." in name:
                    nn.init.zeros_(param)

    def _add_removed_routers(self, rows: list[int]) -> None:
        """Give the MoE layers (block order, attention before MLP) the frozen router rows of removed experts."""
        holders = [
            layer.q_proj if isinstance(layer, MoAttention) else layer
            for block in self.blocks
            for layer in (block.attn, block.mlp)
            if isinstance(layer, (MoAttention, TaskMoE))
        ]
        if len(rows) != len(holders):
            raise ValueError(f"removed_router_rows needs one count per MoE layer ({len(holders)}), got {len(rows)}")
        for holder, count in zip(holders, rows, strict=True):
            if count > 0:
                holder.removed_router = nn.Linear(self.embed_dim, count, bias=False).requires_grad_(False)

    # --- tasks -------------------------------------------------------------------------------------------------------
    def task_index(self, task: int | str | None = None) -> int:
        """Index of ``task`` (a name or an index); ``None``: the innermost :meth:`task` context, else the only task.

        Raises:
            RuntimeError: ``task`` is None, no context is active and the model has several tasks.
            KeyError: Unknown task name.
            IndexError: Index out of range.
        """
        if task is None:
            if self._task_stack:
                task = self._task_stack[-1]
            elif self.num_tasks == 1:
                return 0
            else:
                raise RuntimeError(
                    f"ModSquadViT has {self.num_tasks} tasks {self.task_names} and none was given: pass "
                    "task=<name or index>, or call it inside `with model.task(<name>):`"
                )
        if isinstance(task, str):
            if task not in self.task_names:
                raise KeyError(f"unknown task {task!r}; the model's tasks are {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise IndexError(f"task index {task!r} out of range for the tasks {self.task_names}")
        return task

    @contextmanager
    def task(self, task: int | str) -> Iterator[ModSquadViT]:
        """Context in which calls without a task use ``task`` (nestable; the previous task is restored on exit).

        Args:
            task: Task name or index (checked on entry).

        Yields:
            The model.
        """
        self.task_index(task)
        self._task_stack.append(task)
        try:
            yield self
        finally:
            self._task_stack.pop()

    @property
    def current_task(self) -> int | None:
        """Index of the task a call without ``task`` would use, or None if it would raise."""
        if not self._task_stack and self.num_tasks != 1:
            return None
        return self.task_index()

    # --- timm contract -----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: position embedding, cls token and task embedding."""
        return {"pos_embed", "cls_token", "task_embedding"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into layers (timm layer decay): embeddings, blocks, final norm."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed|^task_embedding",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (routing hooks then fire twice: detach routing statistics)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none); optionally the pooling."""
        if global_pool is not None:
            if global_pool not in ("", "avg", "token"):
                raise ValueError(f"global_pool must be 'avg', 'token' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Prepend the cls token and add the position embedding (resampled to the grid when dynamic)."""
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            b, h, w, c = x.shape
            pos_embed = resample_abs_pos_embed(pos_embed, (h, w), self.patch_embed.grid_size, num_prefix_tokens=1)
            x = x.view(b, -1, c)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def _run_block(self, block: nn.Module, x: Tensor, task: int) -> Tensor:
        # The release adds the task's embedding before every block (MTVisionTransformerMoETaskGating.forward_features).
        x = x + self.task_embedding[:, task : task + 1]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, task, use_reentrant=False)
        return block(x, task)

    def forward_features(self, x: Tensor, task: int | str | None = None) -> Tensor:
        """Tokens after the blocks and the final norm (Identity with ``fc_norm``, as in timm).

        Args:
            x: Images ``(B, in_chans, H, W)``.
            task: Task name or index (None: :meth:`task_index`'s default).

        Returns:
            ``(B, 1 + h·w, D)``, the cls token first.
        """
        index = self.task_index(task)
        x = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            x = self._run_block(block, x, index)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (``avg`` of the patch tokens or the cls ``token``), ``fc_norm``, classifier.

        Args:
            x: ``(B, 1 + N, D)`` from :meth:`forward_features`.
            pre_logits: Return the pooled features ``(B, D)``.

        Returns:
            Logits ``(B, num_classes)`` or pooled features.
        """
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, task: int | str | None = None) -> Tensor:
        """Logits (or pooled features without classes) of images ``(B, in_chans, H, W)`` for ``task``."""
        return self.forward_head(self.forward_features(x, task))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        task: int | str | None = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs as maps (timm's ViT contract), for the task of ``task`` / the context.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            indices: Blocks: the last n if an int, all if None, else the listed ones (negative from the end).
            norm: Apply the final norm to each output.
            stop_early: Stop after the last requested block.
            output_fmt: ``"NCHW"`` (maps) or ``"NLC"`` (patch tokens).
            intermediates_only: Return only the list.
            return_prefix_tokens: Pair each output with its cls token ``(B, 1, D)``.
            task: Task name or index.

        Returns:
            Maps ``(B, D, H / p, W / p)`` (or ``(B, h·w, D)``), optionally after the final features.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        index = self.task_index(task)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self._pos_embed(self.patch_embed(x))
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        outputs = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, index)
            if i in take_indices:
                outputs.append(self.norm(x) if norm else x)
        prefix = [y[:, :1] for y in outputs]
        outputs = [y[:, 1:] for y in outputs]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            outputs = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in outputs]
        result: list[Any] = list(zip(outputs, prefix, strict=True)) if return_prefix_tokens else outputs
        return result if intermediates_only else (self.norm(x), result)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last requested one (and the norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    # --- upcycling ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, state_dict: Mapping[str, Tensor], dense_num_heads: int | None = None, **kwargs: Any
    ) -> tuple[ModSquadViT, UpcycleReport]:
        """Build a model with ``kwargs`` and upcycle it from a timm ViT state dict (:meth:`load_dense_vit`)."""
        model = cls(**kwargs)
        return model, model.load_dense_vit(state_dict, dense_num_heads)

    def load_dense_vit(self, state_dict: Mapping[str, Tensor], dense_num_heads: int | None = None) -> UpcycleReport:
        """Initialise this model in place from a dense timm ViT of the same width (:func:`load_dense_vit`).

        Args:
            state_dict: The dense ViT's state dict (timm keys).
            dense_num_heads: Heads of the dense ViT (default: this model's ``num_heads``).

        Returns:
            What was copied, derived, left new and not used (:class:`UpcycleReport`).
        """
        return load_dense_vit(self, state_dict, dense_num_heads)


def _per_layer(count: int | Sequence[int], layers: int, name: str) -> list[int]:
    """One expert count per layer: an int for every layer, or a list of ``layers`` counts (an extracted model)."""
    counts = [int(count)] * layers if isinstance(count, int) else [int(c) for c in count]
    if len(counts) != layers or min(counts, default=1) < 1:
        raise ValueError(f"{name} must be a positive int or {layers} positive ints (one per layer), got {count!r}")
    return counts


# --- checkpoints and registration ------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ModSquadViT) -> dict[str, Tensor]:
    """Bring a released Mod-Squad (or visionkit) checkpoint to this model.

    Unwraps ``"model"`` / ``"state_dict"``; drops the release's Taskonomy ``task_heads.*``, a ``norm`` / ``fc_norm``
    that this model replaced by Identity (the release has both) and routing statistics (``*.routing_stats.*``) the
    model has none of; resamples ``pos_embed`` to the model's grid. Every other key goes through unchanged (the
    release's names are the model's), so mismatches are reported by the loader.

    Args:
        state_dict: The checkpoint's tensors (possibly wrapped).
        model: The model being loaded.

    Returns:
        The state dict in the model's layout.
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in state_dict.items():
        droppable = key.startswith(("task_heads.", "norm.", "fc_norm.")) or ".routing_stats." in key
        if key not in own and droppable:
            dropped.append(key)
        elif key == "pos_embed" and value.shape != own[key].shape:
            grid = math.isqrt(value.shape[1] - 1)
            out[key] = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), [grid, grid])
        else:
            out[key] = value
    if dropped:
        _logger.info("Mod-Squad checkpoint: dropped %d entries the model has no place for: %s", len(dropped), dropped)
    return out


def _create(variant: str, pretrained: bool, default_out_indices: Sequence[int], **kwargs: Any) -> ModSquadViT:
    return build_model_with_cfg(
        ModSquadViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", tuple(default_out_indices)), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights are published for ImageNet / COCO / ADE20K (only Taskonomy-trained code): no URL.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2212.08066",
        "origin_url": "https://github.com/UMass-Foundation-Model/Mod-Squad",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {"modsquad_vit_base": _cfg(), "modsquad_vit_small": _cfg(), "modsquad_vit_test": _cfg(input_size=(3, 64, 64))}
)


@register_model
def modsquad_vit_base(pretrained: bool = False, **kwargs: Any) -> ModSquadViT:
    """``mtvit_taskgate_att_mlp_base_MI_twice``: ViT-B/16, MoA 24 experts top-12 (head_dim 128), MoE 16 × 768 top-4."""
    args = dict(embed_dim=768, depth=12, num_heads=12, head_dim=128, attn_experts=24, mlp_experts=16, mlp_k=4,
                drop_path_rate=0.1)  # fmt: skip
    return _create("modsquad_vit_base", pretrained, (3, 5, 7, 11), **dict(args, **kwargs))


@register_model
def modsquad_vit_small(pretrained: bool = False, **kwargs: Any) -> ModSquadViT:
    """``mtvit_taskgate_att_mlp_small_MI_twice``: ViT-S/16, MoA 15 experts top-6 (head_dim 128), MoE-MLP 16 × 384."""
    args = dict(embed_dim=384, depth=12, num_heads=6, head_dim=128, attn_experts=15, mlp_experts=16, mlp_k=4,
                drop_path_rate=0.1)  # fmt: skip
    return _create("modsquad_vit_small", pretrained, (3, 5, 7, 11), **dict(args, **kwargs))


@register_model
def modsquad_vit_test(pretrained: bool = False, **kwargs: Any) -> ModSquadViT:
    """A tiny ModSquadViT for CPU tests: 64 × 64 input, dim 32, depth 4, 2 heads of 32, 6 / 4 experts, no weights."""
    args = dict(img_size=64, embed_dim=32, depth=4, num_heads=2, head_dim=32, attn_experts=6, mlp_experts=4, mlp_k=2)
    return _create("modsquad_vit_test", pretrained, (0, 1, 2, 3), **dict(args, **kwargs))
