"""Upcycling a dense timm ViT into a :class:`~visionkit.models.backbones.modsquad_vit.ModSquadViT` of the same width.

The release trains from scratch; upcycling is visionkit's (``docs/methods/modsquad.md``, "Model"). Per parameter:

* **copied**: patch embedding, cls token, every ``norm1`` / ``norm2``, the dense MLPs (even blocks), and ``norm`` /
  ``fc_norm`` / ``head`` where both models have them with the same shape;
* **position embedding**: resampled to the model's grid (timm ``resample_abs_pos_embed``);
* **wide dense attention** (odd blocks, ``num_heads × head_dim`` inner width, ``d`` = the dense head width): head
  ``h`` holds dense head ``h`` in its first ``d`` dims, queries scaled by ``sqrt(head_dim / d)`` (the scale is
  ``head_dim^-0.5``); the other query rows and output columns are zero, the other key / value rows keep their init.
  Same function as the dense attention, and the padding still receives gradients;
* **MoA** (even blocks): expert ``e`` = the ``r = head_dim / d`` dense heads of group ``e mod (heads / r)``
  concatenated (queries ``× sqrt(r)``: a group's logit is the sum of its heads' dense logits), its output projection
  the matching columns of ``proj``; the shared ``kv_proj`` = the mean over the groups of their keys / values
  (mean-pooling of heads, as in GQA uptraining, Ainslie et al. 2023). Query and output biases have no place (MoA
  experts are bias-free) and are dropped. Not the dense function: one K/V head replaces twelve;
* **MoE-MLP** (odd blocks): expert ``e`` = hidden chunk ``e mod C`` of the dense MLP (``C = 4·D / expert_hidden``;
  ViT-B: 4 chunks of 768, each copied into 4 of the 16 experts), output bias ``b2 / k``. ``k`` experts covering the
  ``C`` chunks with unit gates give the dense MLP; the released gates are raw softmax probabilities (about ``1 / E``
  each at first), so the upcycled layer starts as a damped mixture of chunks, not as the dense MLP;
* **task_embedding**: zeros (the dense ViT has none; a fresh model draws N(0, 1) as released);
* **new**: the routers, and whatever the shapes do not allow (then listed in ``new``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import Attention, resample_abs_pos_embed
from torch import Tensor

from visionkit.models.layers import MoAttention, TaskMoE

if TYPE_CHECKING:
    from visionkit.models.backbones.modsquad_vit import ModSquadViT

__all__ = ["UpcycleReport", "load_dense_vit", "unwrap_state_dict"]

#: ``put(name, value, how, source_keys)``: write one parameter and record it in the report.
_Put = Callable[..., None]


@dataclass
class UpcycleReport:
    """What :func:`load_dense_vit` did, by parameter name of the ModSquadViT.

    Attributes:
        copied: Parameters copied unchanged from the dense ViT.
        derived: Parameters computed from dense weights (slices, means, resampling, padding), with how.
        new: Parameters left at their initialisation (routers, and whatever could not be mapped).
        unused: Keys of the dense state dict that were not used.
    """

    copied: list[str] = field(default_factory=list)
    derived: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"upcycled from a dense ViT: {len(self.copied)} copied, {len(self.derived)} derived, {len(self.new)} new "
            f"parameters; {len(self.unused)} dense entries unused"
        )


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tensors of a checkpoint: its ``"model"`` or ``"state_dict"`` entry if it has one, else itself."""
    for container in ("model", "state_dict"):
        if isinstance(state_dict.get(container), Mapping):
            return state_dict[container]
    return state_dict


@torch.no_grad()
def load_dense_vit(
    model: ModSquadViT, state_dict: Mapping[str, Tensor], dense_num_heads: int | None = None
) -> UpcycleReport:
    """Initialise ``model`` (in place) from a dense timm ViT of the same width and patch size (module docstring).

    Args:
        model: The ModSquadViT.
        state_dict: The dense ViT's state dict (timm keys; ``"model"`` / ``"state_dict"`` wrappers unwrapped).
        dense_num_heads: Heads of the dense ViT (default: the model's ``num_heads``, true for timm ViT-S / B).

    Returns:
        The :class:`UpcycleReport`.

    Raises:
        ValueError: The dense ViT has another width or patch size.
    """
    sd = unwrap_state_dict(state_dict)
    params = dict(model.named_parameters())
    report, used = UpcycleReport(), set()
    key = "patch_embed.proj.weight"
    if key not in sd or sd[key].shape != params[key].shape:
        raise ValueError(
            f"dense patch embedding {tuple(sd[key].shape) if key in sd else None} does not match the model's "
            f"{tuple(params[key].shape)} (same width and patch size needed)"
        )

    def put(name: str, value: Tensor, how: str | None = None, source: Sequence[str] = ()) -> None:
        params[name].copy_(value.to(params[name].dtype))
        used.update(source)
        if how is None:
            report.copied.append(name)
        else:
            report.derived[name] = how

    def copy_if_same(name: str) -> None:
        if name in sd and name in params and sd[name].shape == params[name].shape:
            put(name, sd[name], source=[name])

    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
        copy_if_same(name)
    if "pos_embed" in sd and "pos_embed" not in report.copied:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        new = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size), [grid, grid])
        put("pos_embed", new, f"resampled from {grid}x{grid}", ["pos_embed"])
    for name in ("norm", "fc_norm", "head"):
        for suffix in (".weight", ".bias"):
            copy_if_same(name + suffix)
    heads = dense_num_heads or model.num_heads
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            copy_if_same(p + name)
        if block.moe_attn:
            _upcycle_moa(block.attn, sd, p, heads, put)
        else:
            _upcycle_wide_attention(block.attn, sd, p, heads, put)
        if block.moe_mlp:
            _upcycle_moe_mlp(block.mlp, sd, p, put)
        else:
            for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                copy_if_same(f"{p}mlp.{name}")
    model.task_embedding.zero_()
    report.derived["task_embedding"] = "zeros (the dense ViT has none; a fresh model draws N(0, 1) as released)"
    report.new = [n for n in params if n not in report.derived and n not in report.copied]
    report.unused = [k for k in sd if k not in used]
    return report


def _dense_attention(sd: Mapping[str, Tensor], p: str, heads: int) -> tuple[Tensor, ...] | None:
    """``(Wq, Wk, Wv, bq, bk, bv, Wo, bo)`` of timm's ``blocks.i.attn`` per head: ``(H, d, D)``, ``(H, d)``."""
    if f"{p}attn.qkv.weight" not in sd or f"{p}attn.proj.weight" not in sd:
        return None
    w = sd[f"{p}attn.qkv.weight"]
    dim = w.shape[1]
    if w.shape[0] != 3 * dim or dim % heads:
        return None
    b = sd.get(f"{p}attn.qkv.bias", w.new_zeros(w.shape[0]))
    wq, wk, wv = (t.reshape(heads, -1, dim) for t in w.chunk(3))
    bq, bk, bv = (t.reshape(heads, -1) for t in b.chunk(3))
    wo = sd[f"{p}attn.proj.weight"].reshape(dim, heads, -1).permute(1, 2, 0)  # [h, j] = column h·d + j
    bo = sd.get(f"{p}attn.proj.bias", w.new_zeros(dim))
    return wq, wk, wv, bq, bk, bv, wo, bo


def _sources(p: str, names: Sequence[str]) -> list[str]:
    return [f"{p}{name}" for name in names]


def _upcycle_wide_attention(attn: Attention, sd: Mapping[str, Tensor], p: str, heads: int, put: _Put) -> None:
    dense = _dense_attention(sd, p, heads)
    if dense is None or attn.num_heads != heads or attn.head_dim < dense[0].shape[1]:
        return
    wq, wk, wv, bq, bk, bv, wo, bo = dense
    d, hd, dim = wq.shape[1], attn.head_dim, wq.shape[2]
    scale = math.sqrt(hd / d)
    qkv_w = attn.qkv.weight.detach().clone().view(3, heads, hd, dim)
    qkv_w[0] = 0.0
    for j, part in enumerate((wq * scale, wk, wv)):
        qkv_w[j, :, :d] = part
    proj = torch.zeros(heads, hd, dim, dtype=wo.dtype)
    proj[:, :d] = wo
    how = f"dense head h in the first {d} of {hd} dims of head h (same function)"
    src = _sources(p, ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"))
    put(f"{p}attn.qkv.weight", qkv_w.view(-1, dim), how, src)
    if attn.qkv.bias is not None:
        qkv_b = attn.qkv.bias.detach().clone().view(3, heads, hd)
        qkv_b[0] = 0.0
        for j, part in enumerate((bq * scale, bk, bv)):
            qkv_b[j, :, :d] = part
        put(f"{p}attn.qkv.bias", qkv_b.flatten(), how, src)
    put(f"{p}attn.proj.weight", proj.permute(2, 0, 1).reshape(dim, -1), how, src)
    if attn.proj.bias is not None:
        put(f"{p}attn.proj.bias", bo, how, src)


def _upcycle_moa(attn: MoAttention, sd: Mapping[str, Tensor], p: str, heads: int, put: _Put) -> None:
    dense = _dense_attention(sd, p, heads)
    if dense is None or attn.head_dim % dense[0].shape[1] or heads % (attn.head_dim // dense[0].shape[1]):
        return
    wq, wk, wv, _, bk, bv, wo, _ = dense
    r, dim = attn.head_dim // wq.shape[1], wq.shape[2]
    groups = heads // r
    q, k, v, o = (t.reshape(groups, attn.head_dim, dim) for t in (wq, wk, wv, wo))  # group g: heads r·g .. r·g+r-1
    ids = torch.arange(attn.num_experts) % groups
    how = f"expert e = dense heads of group e mod {groups} ({r} heads each)"
    src = _sources(p, ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight"))
    put(f"{p}attn.q_proj.experts.w", q[ids].transpose(1, 2) * math.sqrt(r), how, src)
    put(f"{p}attn.q_proj.output_experts.w", o[ids], how, src)
    kv_how = f"mean over the {groups} head groups of the dense keys / values"
    put(f"{p}attn.kv_proj.0.weight", torch.cat([k.mean(0), v.mean(0)]), kv_how, src)
    if attn.kv_proj[0].bias is not None:
        kv_bias = torch.cat([bk.reshape(groups, -1).mean(0), bv.reshape(groups, -1).mean(0)])
        put(f"{p}attn.kv_proj.0.bias", kv_bias, kv_how, src)


def _upcycle_moe_mlp(mlp: TaskMoE, sd: Mapping[str, Tensor], p: str, put: _Put) -> None:
    names = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    if any(f"{p}{name}" not in sd for name in names):
        return
    w1, b1, w2, b2 = (sd[f"{p}{name}"] for name in names)
    dim, hidden = mlp.experts.w.shape[1:]
    if w1.shape[0] % hidden or w1.shape[1] != dim:
        return
    chunks = w1.shape[0] // hidden
    ids = torch.arange(mlp.num_experts) % chunks
    how = f"expert e = hidden chunk e mod {chunks} of the dense MLP"
    src = _sources(p, names)
    put(f"{p}mlp.experts.w", w1.view(chunks, hidden, dim)[ids].transpose(1, 2), how, src)
    put(f"{p}mlp.output_experts.w", w2.view(dim, chunks, hidden).permute(1, 2, 0)[ids], how, src)
    if mlp.experts.b is not None and mlp.output_experts.b is not None:
        put(f"{p}mlp.experts.b", b1.view(chunks, hidden)[ids], how, src)
        put(f"{p}mlp.output_experts.b", (b2 / mlp.k).expand(mlp.num_experts, -1), f"dense fc2 bias / k = {mlp.k}", src)
