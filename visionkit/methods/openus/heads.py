"""OpenUS heads: the iBOT projection head (CLS + patch outputs) and the SimMIM-style pixel decoder.

Released modules (``XZheng0427/OpenUS`` at ``6b9f6d2``; ``docs/methods/openus.md`` §2, §3):

* ``models/head.py`` ``iBOTHead`` (iBOT's head, unchanged): MLP ``in → hidden → hidden → bottleneck`` with GELU and no
  norm (``norm_in_head=None``, ``act_in_head="gelu"``), L2 normalisation, then a bias-free weight-normalised linear
  layer per output (``last_layer`` for the CLS token, ``last_layer2`` for the patch tokens unless ``shared_head``).
  The student is built with ``shared_head=False``, the teacher with ``shared_head=True``; both 8192-way.
* The backbone's ``decoder``: ``nn.Sequential(Conv2d(768, 32²·3, 1), PixelShuffle(32))``.

State-dict names are the release's, so its ``student`` / ``teacher`` head entries (after stripping ``head.``) and
the backbone's ``decoder.*`` entries load directly: ``mlp.{0,2,4}.{weight,bias}``, ``last_layer.weight_g``
``(out, 1)``, ``last_layer.weight_v`` ``(out, bottleneck)``, ``last_layer2.*`` (also present, as a duplicate, with
``shared_head``, as in the release); the decoder's ``0.weight`` / ``0.bias``. The weight norm is written out here
(same keys as the deprecated ``torch.nn.utils.weight_norm``, without its deep-copy and hook caveats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IBOTHead", "PixelShuffleDecoder", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``y = x·Wᵀ`` with ``W = g · v / ‖v‖`` (row norms), stored as ``weight_g``, ``weight_v``.

    Equivalent to ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with 1, as
    iBOT builds its last layers; ``weight_v`` keeps ``nn.Linear``'s default initialisation (the release creates the
    last layers after applying its truncated-normal init, so they are not re-initialised).

    Args:
        in_features: Input features.
        out_features: Output features.
        fixed_gain: Freeze ``weight_g`` at 1 (``requires_grad=False``; iBOT's ``norm_last_layer=True``).
    """

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default

    @property
    def weight(self) -> Tensor:
        """The effective ``(out_features, in_features)`` weight ``g · v / ‖v‖``."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        """Sizes shown by ``repr``."""
        return f"in_features={self.in_features}, out_features={self.out_features}"


class IBOTHead(nn.Module):
    """iBOT projection head for the CLS token and the patch tokens (released ``models/head.py`` ``iBOTHead``).

    ``tokens → MLP → L2-normalise → last_layer`` (token 0) and ``→ last_layer2`` (tokens 1..L). The MLP has ``nlayers``
    linear layers (GELU between them, no norm; a single ``Linear(in_dim, bottleneck_dim)`` when ``nlayers == 1``),
    initialised with a truncated normal (std 0.02, cut at ±2) and zero biases.

    Args:
        in_dim: Token feature size (VMamba-S: 768).
        out_dim: CLS output size (8192).
        patch_out_dim: Patch output size (8192); must equal ``out_dim`` with ``shared_head``.
        hidden_dim: MLP hidden size (2048).
        bottleneck_dim: MLP output size before normalisation (256); must be positive.
        nlayers: Number of MLP linear layers (3), at least 1.
        norm_last_layer: Freeze the weight-norm gains at 1 (``weight_g.requires_grad = False``).
        shared_head: Use ``last_layer`` for the patches too (``last_layer2`` is the same module).

    Raises:
        ValueError: A size is not positive, ``nlayers < 1``, or ``shared_head`` with ``patch_out_dim != out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = False,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, patch_out_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError(
                "sizes must be positive, got "
                f"{in_dim=}, {out_dim=}, {patch_out_dim=}, {hidden_dim=}, {bottleneck_dim=} "
                "(the release's bottleneck_dim=0 variant is not supported)"
            )
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if shared_head and patch_out_dim != out_dim:
            raise ValueError(f"shared_head needs patch_out_dim == out_dim, got {patch_out_dim} and {out_dim}")
        self.out_dim = out_dim
        self.patch_out_dim = patch_out_dim
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)
        self.last_layer2 = (
            self.last_layer if shared_head else WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer)
        )

    def _project(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Project the CLS token and the patch tokens.

        Args:
            tokens: ``(B, 1 + L, in_dim)``, the CLS token first (OpenUS: the mean of the 49 stage-4 tokens).

        Returns:
            ``(cls, patches)``: ``(B, out_dim)`` and ``(B, L, patch_out_dim)`` logits.

        Raises:
            ValueError: ``tokens`` is not 3-D with at least one token.
        """
        if tokens.ndim != 3 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, 1 + L, in_dim), got {tuple(tokens.shape)}")
        x = self._project(tokens)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])

    def forward_cls(self, features: Tensor) -> Tensor:
        """Project pooled features only (the release's 2-D input path).

        Args:
            features: ``(B, in_dim)``.

        Returns:
            ``(B, out_dim)`` logits.
        """
        return self.last_layer(self._project(features))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``last_layer`` and ``last_layer2`` (once when shared)."""
        params = {id(p): p for layer in (self.last_layer, self.last_layer2) for p in layer.parameters()}
        return list(params.values())

    def cancel_last_layer_gradients(self, epoch: int, freeze_epochs: int = 1) -> bool:
        """Drop the last layers' gradients while ``epoch < freeze_epochs`` (released ``cancel_gradients_last_layer``).

        Call after ``backward`` (and clipping) and before the optimiser step. Gradients are set to ``None``, so the
        optimiser skips these parameters entirely (no weight decay either), as in the release. OpenUS freezes them
        during epoch 0 (``--freeze_last_layer 1``).

        Args:
            epoch: Current epoch.
            freeze_epochs: Number of initial epochs with frozen last layers.

        Returns:
            Whether the gradients were dropped.
        """
        if epoch >= freeze_epochs:
            return False
        for param in self.last_layer_parameters():
            param.grad = None
        return True


class PixelShuffleDecoder(nn.Sequential):
    """SimMIM-style pixel decoder: ``Conv2d(in_dim, stride²·out_chans, 1)`` then ``PixelShuffle(stride)``.

    A ``Sequential`` so that its entries are named ``0.weight`` / ``0.bias``: registered as ``decoder`` on a backbone it
    reproduces the release's ``decoder.0.*`` keys. The convolution keeps PyTorch's default initialisation.

    Args:
        in_dim: Channels of the feature map (VMamba-S stage 4: 768).
        stride: Upsampling factor, the feature stride in pixels (32).
        out_chans: Output image channels (3).

    Raises:
        ValueError: A size is not positive.
    """

    def __init__(self, in_dim: int = 768, stride: int = 32, out_chans: int = 3) -> None:
        if min(in_dim, stride, out_chans) <= 0:
            raise ValueError(f"sizes must be positive, got {in_dim=}, {stride=}, {out_chans=}")
        super().__init__(nn.Conv2d(in_dim, stride**2 * out_chans, kernel_size=1), nn.PixelShuffle(stride))
        self.in_dim = in_dim
        self.stride = stride
        self.out_chans = out_chans

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct pixels.

        Args:
            features: ``(B, in_dim, h, w)`` feature map.

        Returns:
            ``(B, out_chans, h·stride, w·stride)`` reconstruction (in the normalised input space).

        Raises:
            ValueError: ``features`` is not ``(B, in_dim, h, w)``.
        """
        if features.ndim != 4 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must have shape (B, {self.in_dim}, h, w), got {tuple(features.shape)}")
        return super().forward(features)
