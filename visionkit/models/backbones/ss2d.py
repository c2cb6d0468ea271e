"""VMamba v2 building blocks: ``LayerNorm2d``, ``Linear2d``, SS2D, ``VSSBlock``, stem, downsampling, stage and head.

Everything here is channel-first (``(B, C, H, W)``), as VMamba v2 with ``norm_layer="ln2d"``. SS2D implements the
forward type ``v05_noz`` of ``MzeroMiko/VMamba`` (``SS2Dv2.forward_corev2`` with ``no_einsum=True``, no z gate), the
mixer of every released VMamba v2 checkpoint; parameter names and shapes follow the official ones so that those
checkpoints load unchanged (``docs/models/vmamba.md``, "Layer by layer" and "Checkpoint layout").
:func:`record_scan_inputs` records what one SS2D hands to its selective scan (for
:func:`visionkit.ops.mamba_attention_map`) without changing any output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from torch import Tensor, nn

from visionkit.ops.cross_scan import CROSS_SCAN_DIRECTIONS, cross_merge, cross_scan
from visionkit.ops.selective_scan import selective_scan

__all__ = [
    "SS2D",
    "LayerNorm2d",
    "Linear2d",
    "Mlp2d",
    "SS2DScanRecord",
    "VSSBlock",
    "VSSMHead",
    "VSSMStage",
    "downsample_v3",
    "patch_embed_v2",
    "record_scan_inputs",
    "resolve_dt_rank",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (VMamba's ``LayerNorm(..., channel_first=True)``).

    Args:
        num_channels: ``C``.
        eps: Added to the variance; 1e-5, ``nn.LayerNorm``'s default, which VMamba keeps (timm's ``LayerNorm2d``
            defaults to 1e-6).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``(B, C, H, W)`` over ``C``; returns the same shape."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A per-pixel linear layer on ``(B, C_in, H, W)`` maps: a 1x1 convolution that keeps ``nn.Linear``'s weights.

    The weight is stored as ``(out, in)`` like ``nn.Linear`` (the layout of VMamba's checkpoints, and what makes the
    model's ``_init_weights`` treat it as a Linear); a ``(out, in, 1, 1)`` 1x1-conv weight loads too.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``(B, in, H, W)`` to ``(B, out, H, W)``."""
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.shape == (*self.weight.shape, 1, 1):
            state_dict[prefix + "weight"] = weight.flatten(1)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class Mlp2d(nn.Module):
    """Channel MLP of a VSSBlock: ``Linear2d(dim → hidden)``, GELU, ``Linear2d(hidden → dim)`` (names ``fc1``, ``fc2``).

    Args:
        dim: Input and output channels.
        hidden: Hidden channels (``mlp_ratio · dim``).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``(B, dim, H, W)`` to the same shape."""
        return self.fc2(self.act(self.fc1(x)))


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """The rank R of the Δ projection: ``"auto"`` is ``ceil(d_model / 16)`` (Mamba's and VMamba's rule)."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, int) and not isinstance(dt_rank, bool) and dt_rank > 0:
        return dt_rank
    raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")


class SS2D(nn.Module):
    """2D selective scan (VMamba v2 SS2D, forward type ``v05_noz``) on channel-first maps.

    ``x`` ``(B, d_model, H, W)`` → ``in_proj`` (1x1, no bias) → depthwise ``d_conv``x``d_conv`` conv (``conv_bias``)
    → SiLU → :func:`~visionkit.ops.cross_scan` into K = 4 sequences of length L = H·W → per direction k, projections
    ``x_proj_weight[k]`` (d_inner → R + 2N: Δ-rank, B, C) and ``dt_projs_weight[k]`` (R → d_inner) → one selective
    scan over the 4·d_inner channels with B/C as 4 groups (``A = -exp(A_logs)``, ``D = Ds``,
    ``delta_bias = dt_projs_bias``, softplus on Δ) → :func:`~visionkit.ops.cross_merge` (sum of the 4 directions
    in raster order) → ``out_norm`` (LayerNorm over channels) → ``out_proj`` (1x1, no bias). No z gate and no output
    activation.

    Initialisation is Mamba's (VMamba ``mamba_init``, "v0"): ``A_logs = log(1..N)``, ``Ds = 1``, Δ-projection weights
    U(±R^-0.5), Δ bias = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max] (floor ``dt_init_floor``), and
    ``x_proj_weight`` as ``nn.Linear``'s default (U(±d_inner^-0.5)), which VMamba's stacked ``nn.Linear`` weights keep.
    ``in_proj`` / ``out_proj`` are plain Linear layers that the owning model re-initialises.

    Args:
        d_model: Input / output channels.
        d_state: State size N per channel (1 in every VMamba v2 model).
        ssm_ratio: ``d_inner = int(ssm_ratio · d_model)``.
        dt_rank: Rank R of the Δ projection, or ``"auto"`` = ``ceil(d_model / 16)``.
        d_conv: Odd kernel size of the depthwise convolution.
        conv_bias: Whether the depthwise convolution has a bias (False in VMamba v2).
        dt_min: Smallest initial Δ.
        dt_max: Largest initial Δ.
        dt_init_floor: Floor of the initial Δ.
        scan_backend: Backend of :func:`visionkit.ops.selective_scan` (``"auto"``, ``"torch"``, ``"numba"``,
            ``"triton"``, ``"mamba_ssm"``, ``"reference"``).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"SS2D needs an odd d_conv >= 1 (same-size depthwise conv), got {d_conv}")
        k = CROSS_SCAN_DIRECTIONS
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, self.d_model)
        self.scan_backend = scan_backend

        self.in_proj = Linear2d(self.d_model, self.d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner, bias=conv_bias
        )
        self.act = nn.SiLU()
        bound = self.d_inner**-0.5  # nn.Linear's default init of each direction's (R + 2N, d_inner) projection
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, self.dt_rank + 2 * self.d_state, self.d_inner).uniform_(-bound, bound)
        )
        dt_bound = self.dt_rank**-0.5  # Mamba: "preserve variance at initialization" (dt_scale 1)
        self.dt_projs_weight = nn.Parameter(torch.empty(k, self.d_inner, self.dt_rank).uniform_(-dt_bound, dt_bound))
        self.dt_projs_bias = nn.Parameter(
            _inverse_softplus_dt(k * self.d_inner, dt_min, dt_max, dt_init_floor).view(k, self.d_inner)
        )
        # S4D-real initialisation A_n = -n (A = -exp(A_log)); with N = 1, A = -1.
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(k * self.d_inner, 1)
        self.A_logs = nn.Parameter(a_log)
        self.Ds = nn.Parameter(torch.ones(k * self.d_inner))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_norm = LayerNorm2d(self.d_inner)
        self.out_proj = Linear2d(self.d_inner, self.d_model, bias=False)
        # Callbacks that see the scan inputs of every forward (set by record_scan_inputs; empty otherwise).
        self._scan_observers: list[Callable[[SS2DScanRecord], None]] = []

    def forward(self, x: Tensor) -> Tensor:
        """Mix ``x`` ``(B, d_model, H, W)`` along the four scan directions; returns the same shape."""
        x = self.act(self.conv2d(self.in_proj(x)))
        y = self.forward_core(x)
        return self.out_proj(self.out_norm(y))

    def forward_core(self, x: Tensor) -> Tensor:
        """The scan part: ``(B, d_inner, H, W)`` after conv + SiLU → merged scan output, same shape."""
        batch, _, height, width = x.shape
        k, d_inner, rank, n = CROSS_SCAN_DIRECTIONS, self.d_inner, self.dt_rank, self.d_state
        length = height * width
        xs = cross_scan(x)  # (B, K, d_inner, L)
        # Per direction k: (R + 2N, d_inner) @ (d_inner, L); VMamba computes the same product as a grouped conv1d.
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, K, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [rank, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (B, K, d_inner, L)
        delta = dts.reshape(batch, k * d_inner, length)
        A = -torch.exp(_at_least_fp32(self.A_logs))
        bs, cs = bs.contiguous(), cs.contiguous()
        delta_bias = _at_least_fp32(self.dt_projs_bias.reshape(-1))
        for observer in self._scan_observers:
            observer(SS2DScanRecord(delta, A, bs, cs, delta_bias, height, width))
        y = selective_scan(
            xs.reshape(batch, k * d_inner, length),
            delta,
            A,
            bs,
            cs,
            D=_at_least_fp32(self.Ds),
            delta_bias=delta_bias,
            delta_softplus=True,
            backend=self.scan_backend,
        )
        y = cross_merge(y.view(batch, k, d_inner, height, width))
        return y.view(batch, d_inner, height, width)


class SS2DScanRecord(NamedTuple):
    """What one SS2D forward hands to its selective scan (the inputs of :func:`visionkit.ops.mamba_attention_map`).

    Attributes:
        delta: Step sizes before bias and softplus, ``(batch, 4·d_inner, L)``.
        A: ``-exp(A_logs)``, ``(4·d_inner, N)``, float32 (float64 for a float64 model).
        B: Input projections, one group per scan direction, ``(batch, 4, N, L)``.
        C: Output projections, ``(batch, 4, N, L)``.
        delta_bias: ``dt_projs_bias`` flattened, ``(4·d_inner,)``, float32 (float64 for a float64 model).
        height: Rows H of the scanned map.
        width: Columns W; ``L = H·W``.
    """

    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    delta_bias: Tensor
    height: int
    width: int


@contextmanager
def record_scan_inputs(
    model: nn.Module, stage: int = -1, block: int = -1, *, detach: bool = True
) -> Iterator[list[SS2DScanRecord]]:
    """Record the selective-scan inputs of one SS2D of a VMamba model, one record per forward, inside the block.

    The model's outputs are unchanged: the SS2D only hands the tensors it already computed to the recorder. The
    recorder is removed on exit, also when the block raises. With gradient checkpointing on, the recomputation in
    the backward pass appends one more record per checkpointed forward.

    Example::

        with record_scan_inputs(teacher, stage=-1, block=-1) as records:
            teacher(images)
        r = records[-1]
        attention = mamba_attention_map(
            r.delta, r.A, r.B, r.C, height=r.height, width=r.width, delta_bias=r.delta_bias
        )

    Args:
        model: A ``VSSM`` or a module containing one (the first submodule with ``layers`` of stages with ``blocks``).
        stage: Index into ``model.layers`` (negative counts from the end; -1 is the last stage).
        block: Index into that stage's ``blocks`` (negative counts from the end).
        detach: Record detached tensors (no autograd graph kept alive); False keeps them attached.

    Yields:
        The list the records are appended to.

    Raises:
        TypeError: ``model`` holds no VMamba stages, or the chosen block has no ``SS2D`` ``op``.
        IndexError: ``stage`` or ``block`` is out of range (the message gives the valid ranges).
    """
    ss2d = _select_ss2d(model, stage, block)
    records: list[SS2DScanRecord] = []

    def observe(record: SS2DScanRecord) -> None:
        if detach:
            record = record._replace(**{f: getattr(record, f).detach() for f in ("delta", "A", "B", "C", "delta_bias")})
        records.append(record)

    ss2d._scan_observers.append(observe)
    try:
        yield records
    finally:
        ss2d._scan_observers.remove(observe)


def _select_ss2d(model: nn.Module, stage: int, block: int) -> SS2D:
    """The SS2D of ``model.layers[stage].blocks[block]`` (``model`` or its first submodule with VMamba stages)."""
    host = next((m for m in model.modules() if _has_stages(m)), None)
    if host is None:
        raise TypeError(
            f"record_scan_inputs: {type(model).__name__} holds no VMamba stages (a module with `layers` whose "
            "entries have `blocks`); pass a VSSM or a module containing one."
        )
    stages = list(host.layers)  # type: ignore[arg-type]
    if not -len(stages) <= stage < len(stages):
        raise IndexError(
            f"record_scan_inputs: stage {stage} is out of range; the model has {len(stages)} stages "
            f"(0..{len(stages) - 1}, or -{len(stages)}..-1)"
        )
    blocks = list(stages[stage].blocks)
    if not -len(blocks) <= block < len(blocks):
        raise IndexError(
            f"record_scan_inputs: block {block} is out of range; stage {stage} has {len(blocks)} blocks "
            f"(0..{len(blocks) - 1}, or -{len(blocks)}..-1); blocks per stage: {[len(s.blocks) for s in stages]}"
        )
    op = getattr(blocks[block], "op", None)
    if not isinstance(op, SS2D):
        raise TypeError(
            f"record_scan_inputs: block {block} of stage {stage} has no SS2D `op` (got {type(op).__name__})"
        )
    return op


def _has_stages(module: nn.Module) -> bool:
    layers = getattr(module, "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(hasattr(s, "blocks") for s in layers)


def _at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is (the scan's A / D / Δ-bias stay fp32 when the model runs in half)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _inverse_softplus_dt(size: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """Δ biases b with softplus(b) = dt, dt log-uniform in [dt_min, dt_max] and at least ``floor`` (Mamba's dt init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt) = dt + log(1 - exp(-dt))


class VSSBlock(nn.Module):
    """VMamba v2 block, pre-norm: ``x + DropPath(SS2D(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``.

    Parameter names follow the official block: ``norm``, ``op`` (the SS2D), ``norm2``, ``mlp.fc1``, ``mlp.fc2``.

    Args:
        dim: Channels.
        drop_path: Stochastic depth rate of both residual branches.
        mlp_ratio: MLP hidden channels = ``int(dim · mlp_ratio)``.
        **ssm_kwargs: Arguments of :class:`SS2D` (``d_state``, ``ssm_ratio``, ``dt_rank``, ``d_conv``, ``conv_bias``,
            ``scan_backend``).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ssm_kwargs: Any) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``(B, dim, H, W)`` to the same shape."""
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def patch_embed_v2(in_chans: int, dim: int) -> nn.Sequential:
    """Patch embed v2: conv 3x3/2 → LN → GELU → conv 3x3/2 → LN (stride 4).

    The Identity slots keep the official indices (weights at ``0``, ``2``, ``5``, ``7``).
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(dim // 2),
        nn.Identity(),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(dim),
    )


def downsample_v3(dim: int, out_dim: int) -> nn.Sequential:
    """Downsample v3: conv 3x3/2 → LN; Identity slots keep the official indices (weights at ``1`` and ``3``)."""
    return nn.Sequential(
        nn.Identity(), nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1), nn.Identity(), LayerNorm2d(out_dim)
    )


class VSSMStage(nn.Module):
    """One stage: ``blocks`` (VSSBlocks at constant resolution) then ``downsample`` (Identity after the last stage)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        """Run the blocks on ``x`` ``(B, C, H, W)``; returns the stage's feature map (before downsampling)."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Blocks then downsampling: ``(B, C, H, W)`` → ``(B, C', H/2, W/2)`` (unchanged size after the last stage)."""
        return self.downsample(self.forward_blocks(x))


class VSSMHead(nn.Module):
    """Classifier: ``norm`` (LayerNorm over channels, per position) → global average pool → ``head`` (Linear)."""

    def __init__(self, num_features: int, num_classes: int, global_pool: str = "avg") -> None:
        super().__init__()
        self.norm: nn.Module = LayerNorm2d(num_features)
        self.global_pool = ""
        self.head: nn.Module = nn.Identity()
        self.reset(num_features, num_classes, global_pool)

    def reset(self, num_features: int, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the linear layer (``num_classes`` 0: Identity) and optionally the pooling (``"avg"`` or ``""``)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"VSSM supports global_pool 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        if num_classes > 0 and not self.global_pool:
            raise ValueError(f"a {num_classes}-class classifier needs global_pool='avg', not {self.global_pool!r}")
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``x`` ``(B, C, H, W)`` → logits ``(B, classes)``, or pooled features ``(B, C)`` (map if not pooling)."""
        x = self.norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)
