"""OpenUS masks: the self-adaptive token mask of the global crops and iBOT's block masks of the dataset.

Released behaviour reproduced here (``XZheng0427/OpenUS`` at ``6b9f6d2``; ``docs/methods/openus.md`` §5, §6):

* :func:`adaptive_mask`: ``utils.GlobalAttGuidedMask_2`` (top-scoring tokens plus a uniform random fill).
* :func:`masking_score`, :func:`alpha_at`, :func:`top_fraction_at`: the score and schedules of ``main_openus.py``
  (``train_one_epoch``).
* :class:`ReconImportance`: the backbone's ``update_ema_loss_map`` state plus ``train_one_epoch``'s
  ``prev_recon_importance``.
* :func:`block_mask`: the ``pred_shape="block"`` loop of ``dataset/datasets_us308k_flexible.py`` (iBOT's).

Randomness only comes from an explicit ``torch.Generator`` (the global RNG of the generator's device when ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ReconImportance",
    "adaptive_mask",
    "alpha_at",
    "block_mask",
    "block_masks",
    "masking_score",
    "top_fraction_at",
]

# Counts are ceil / floor of float products such as 0.28·25 = 7.000000000000001 or 0.29·100 = 28.999999999999996;
# rounding to 1e-9 first gives the counts of the decimal values (7 and 29; the release's raw products give 8 and 28).
_COUNT_DIGITS = 9


def _count(x: float, rounding: Callable[[float], int]) -> int:
    return rounding(round(x, _COUNT_DIGITS))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_epoch(epoch: int, epochs: int) -> None:
    if not 0 <= epoch <= epochs or epochs <= 0:
        raise ValueError(f"need epochs > 0 and epoch in [0, epochs], got epoch={epoch}, epochs={epochs}")


def adaptive_mask(
    score: Tensor,
    mask_ratio: float = 0.6,
    top_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Self-adaptive token mask (released ``GlobalAttGuidedMask_2``): top-scoring tokens plus a random fill.

    Every row gets exactly ``m = ceil(mask_ratio·L)`` masked tokens. With ``k = floor(L·top_fraction)``: if ``k >= m``
    the ``m`` highest scores are masked; otherwise the ``k`` highest plus ``m - k`` tokens drawn uniformly without
    replacement from the remaining ``L - k``. Ties among equal scores are broken by ``torch.topk``. Both counts are
    taken of the decimal products (``ceil(0.28·25) = 7``; the release's float product gives 8).

    Args:
        score: ``(B, L)`` masking score (higher = masked first), e.g. :func:`masking_score`.
        mask_ratio: Fraction ``r`` of tokens masked (OpenUS: 0.6, so 30 of 49).
        top_fraction: Share ``m_t`` of all ``L`` tokens taken by score (:func:`top_fraction_at`; 0.1 at epoch 0).
        generator: Source of the random fill; its device is used for the draws.

    Returns:
        ``(B, L)`` bool mask on ``score``'s device, ``True`` = masked.

    Raises:
        ValueError: ``score`` is not a 2-D floating tensor with ``L >= 1``, or a fraction lies outside [0, 1].
    """
    if score.ndim != 2 or score.shape[1] < 1:
        raise ValueError(f"score must have shape (B, L) with L >= 1, got {tuple(score.shape)}")
    if not score.is_floating_point():
        raise ValueError(f"score must be a floating tensor, got {score.dtype}")
    _check_fraction("mask_ratio", mask_ratio)
    _check_fraction("top_fraction", top_fraction)
    batch, length = score.shape
    num_masked = _count(mask_ratio * length, math.ceil)
    num_top = _count(length * top_fraction, math.floor)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=score.device)
    if num_top >= num_masked:
        mask.scatter_(1, score.topk(num_masked, dim=1).indices, True)
        return mask
    mask.scatter_(1, score.topk(num_top, dim=1).indices, True)
    # A uniformly random subset of the non-top tokens: the m - k smallest of i.i.d. keys, top tokens pushed past 1.
    device = score.device if generator is None else generator.device
    keys = torch.rand(batch, length, generator=generator, device=device).to(score.device).masked_fill(mask, 2.0)
    fill = keys.topk(num_masked - num_top, dim=1, largest=False).indices
    return mask.scatter_(1, fill, True)


def _min_max(x: Tensor) -> Tensor:
    """Per-row min–max normalisation with 1e-8 in the denominator (released)."""
    low, high = x.aminmax(dim=1, keepdim=True)
    return (x - low) / (high - low + 1e-8)


def masking_score(
    attention: Tensor,
    recon_importance: Tensor | None,
    alpha: float,
    convention: Literal["code", "paper"] = "code",
) -> Tensor:
    """Masking score from the teacher attention map and the student's reconstruction importance.

    ``A_t = attention.mean(dim=1)`` (mean over queries: how much each token is attended) and ``L_s =
    recon_importance.mean(dim=1)`` (mean over channels), each min–max normalised per row. ``convention="code"``
    (released ``train_one_epoch``) returns ``α·A_t + (1 - α)·L_s``; ``"paper"`` (Fig. 1, commented out in the
    release) returns ``(1 - α)·A_t + α·L_s``. Without ``recon_importance`` (first iteration) the score is ``A_t``:
    the release then ranks the raw ``attention.mean(1)``, which orders tokens identically.

    Args:
        attention: ``(B, L, L)`` teacher attention map (query × key).
        recon_importance: ``(B, C, L)`` reconstruction importance of the previous batch, or ``None``.
        alpha: Blend weight in [0, 1] (:func:`alpha_at`).
        convention: ``"code"`` (default) or ``"paper"``.

    Returns:
        ``(B, L)`` score in [0, 1], in ``attention``'s dtype.

    Raises:
        ValueError: Shapes do not match, ``alpha`` lies outside [0, 1] or ``convention`` is unknown.
    """
    if attention.ndim != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must have shape (B, L, L), got {tuple(attention.shape)}")
    _check_fraction("alpha", alpha)
    if convention not in ("code", "paper"):
        raise ValueError(f"convention must be 'code' or 'paper', got {convention!r}")
    attended = _min_max(attention.mean(dim=1))
    if recon_importance is None:
        return attended
    batch, length = attended.shape
    if recon_importance.ndim != 3 or recon_importance.shape[0] != batch or recon_importance.shape[2] != length:
        raise ValueError(
            f"recon_importance must have shape (B={batch}, C, L={length}), got {tuple(recon_importance.shape)}"
        )
    student = _min_max(recon_importance.mean(dim=1)).to(attended.dtype)
    teacher_weight = alpha if convention == "code" else 1.0 - alpha
    return teacher_weight * attended + (1.0 - teacher_weight) * student


def alpha_at(
    epoch: int,
    epochs: int,
    start: float = 0.1,
    end: float = 0.9,
    schedule: Literal["cosine", "linear", "constant"] = "cosine",
) -> float:
    """Teacher weight α of the masking score at an epoch (released ``train_one_epoch``).

    ``"cosine"``: ``start + (end - start)·(1 - cos(π·e/E))/2``; ``"linear"``: ``start + (end - start)·e/E``;
    ``"constant"``: ``start`` (the release's value without ``--adaptive_weighting``; its ``--alpha_schedule constant``
    with adaptive weighting leaves α unset and would crash). OpenUS trains with 0.1 → 0.9 (argparse: 0.2 → 0.5).

    Args:
        epoch: Current epoch ``e`` in ``[0, E]``.
        epochs: Total epochs ``E`` (OpenUS: 151).
        start: α at epoch 0.
        end: α at epoch ``E``.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.

    Returns:
        α as a Python float.

    Raises:
        ValueError: ``epochs <= 0``, ``epoch`` outside ``[0, epochs]`` or an unknown schedule.
    """
    _check_epoch(epoch, epochs)
    if schedule == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "linear":
        return start + (end - start) * (epoch / epochs)
    if schedule == "constant":
        return start
    raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def top_fraction_at(epoch: int, epochs: int, start: float = 0.1, end: float = 0.9) -> float:
    """Share ``m_t = start + (e/E)·(end - start)`` of tokens masked by score (released ``train_one_epoch``).

    With ``E = 151``, ``L = 49``, ``r = 0.6``: ``k = floor(49·m_t)`` is 4 at epoch 0, first reaches ``m = 30`` at epoch
    97 (deterministic top 30 from then on). Without student feedback the release starts at 0.001.

    Args:
        epoch: Current epoch ``e`` in ``[0, E]``.
        epochs: Total epochs ``E``.
        start: ``m_t`` at epoch 0.
        end: ``m_t`` at epoch ``E``.

    Returns:
        ``m_t`` as a Python float.

    Raises:
        ValueError: ``epochs <= 0`` or ``epoch`` outside ``[0, epochs]``.
    """
    _check_epoch(epoch, epochs)
    return start + (epoch / epochs) * (end - start)


class ReconImportance(nn.Module):
    """Student reconstruction importance ``L_s``, carried from one iteration to the next (released OpenUS).

    :meth:`update` takes the current global crops' per-patch errors ``E`` (``masked_patch_error``: per 32-px patch and
    channel the mean masked squared pixel error, 0 on unmasked patches) and, as the released ``update_ema_loss_map``:
    (1) sets ``ema_loss_map`` to the batch mean ``Ē = E.mean(0)`` on the first update (and ``ema_initialized``), to
    ``momentum·ema_loss_map + (1 - momentum)·Ē`` later; (2) stores ``blend·E + (1 - blend)·ema_loss_map`` (0.7 /
    0.3), flattened to ``(B, C, h·w)``, as the importance the *next* iteration's :func:`masking_score` uses (the
    release's ``prev_recon_importance``: from other images, kept across epochs).

    State is in persistent buffers (exact resume): ``ema_loss_map`` ``(1, C, h, w)`` and ``ema_initialized`` (bool
    scalar, the release's names), ``previous_importance`` ``(B, C, h·w)``. The two maps are empty (``(0,)``) before the
    first update and take the stored shapes when a state dict is loaded, so any checkpoint loads into a fresh module.

    Batch-size rule: row ``i`` of :meth:`importance` is stored row ``i mod B_prev``: a smaller batch (an epoch's last,
    without ``drop_last``) takes the first rows, a larger one repeats them (rows come from other images anyway).

    Args:
        momentum: EMA momentum of the batch-mean map (released 0.7).
        blend: Weight of the current batch's errors against the EMA map (released 0.7).

    Raises:
        ValueError: ``momentum`` or ``blend`` lies outside [0, 1].
    """

    ema_loss_map: Tensor
    ema_initialized: Tensor
    previous_importance: Tensor

    def __init__(self, momentum: float = 0.7, blend: float = 0.7) -> None:
        super().__init__()
        for name, value in (("momentum", momentum), ("blend", blend)):
            _check_fraction(name, value)
        self.momentum, self.blend = momentum, blend
        self.register_buffer("ema_loss_map", torch.zeros(0))
        self.register_buffer("ema_initialized", torch.tensor(False))
        self.register_buffer("previous_importance", torch.zeros(0))

    @property
    def has_importance(self) -> bool:
        """Whether an importance is stored (after an :meth:`update`)."""
        return self.previous_importance.numel() > 0

    @torch.no_grad()
    def update(self, patch_error: Tensor) -> Tensor:
        """Fold in the current batch's patch errors and store the importance for the next iteration.

        Args:
            patch_error: ``(B, C, h, w)`` per-patch masked squared error of the global crops (B >= 1).

        Returns:
            ``(B, C, h·w)`` float32 importance just stored (detached).

        Raises:
            ValueError: ``patch_error`` is not 4-D with ``B >= 1``, or its ``(C, h, w)`` differs from the running map.
        """
        if patch_error.ndim != 4 or patch_error.shape[0] < 1:
            raise ValueError(f"patch_error must have shape (B, C, h, w) with B >= 1, got {tuple(patch_error.shape)}")
        error = patch_error.detach().float()
        batch_mean = error.mean(dim=0, keepdim=True)
        if bool(self.ema_initialized):
            if self.ema_loss_map.shape != batch_mean.shape:
                raise ValueError(
                    f"patch_error has (C, h, w) = {tuple(error.shape[1:])} but the running map has "
                    f"{tuple(self.ema_loss_map.shape[1:])}; call reset() to start over on a new grid"
                )
            self.ema_loss_map = self.momentum * self.ema_loss_map + (1.0 - self.momentum) * batch_mean
        else:
            self.ema_loss_map = batch_mean
            self.ema_initialized = torch.tensor(True, device=error.device)
        importance = self.blend * error + (1.0 - self.blend) * self.ema_loss_map
        self.previous_importance = importance.flatten(2)
        return self.previous_importance

    def importance(self, batch: int) -> Tensor | None:
        """The stored importance for a batch of ``batch`` rows (see the batch-size rule), or ``None`` before any update.

        Args:
            batch: Rows wanted (the number of global-crop images, ``num_global·B``).

        Returns:
            ``(batch, C, h·w)`` float32 or ``None``.

        Raises:
            ValueError: ``batch < 1``.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not self.has_importance:
            return None
        stored = self.previous_importance
        if batch == stored.shape[0]:
            return stored
        rows = torch.arange(batch, device=stored.device) % stored.shape[0]
        return stored[rows]

    def reset(self) -> None:
        """Forget all state (as a freshly built module)."""
        self.ema_loss_map = self.ema_loss_map.new_zeros(0)
        self.ema_initialized = torch.tensor(False, device=self.ema_initialized.device)
        self.previous_importance = self.previous_importance.new_zeros(0)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The map sizes are only known once training has run: take them from the checkpoint before the copy.
        for name in ("ema_loss_map", "previous_importance"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, Tensor):
                current = getattr(self, name)
                setattr(self, name, current.new_empty(stored.shape))
        flag = state_dict.get(prefix + "ema_initialized")
        if isinstance(flag, Tensor):  # released checkpoints may hold it with another dtype or shape
            state_dict[prefix + "ema_initialized"] = torch.tensor(bool(flag.numel() and flag.reshape(-1)[0]))
        super()._load_from_state_dict(state_dict, prefix, *args)


class _Uniforms:
    """Uniform [0, 1) doubles from a CPU generator, drawn 64 at a time (one tensor call per chunk, not per draw).

    A generator on another device seeds a CPU generator with one draw, so masks cost one device sync per call.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        if generator is not None and generator.device.type != "cpu":
            seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
            generator = torch.Generator().manual_seed(seed)
        self._generator = generator
        self._values: list[float] = []

    def uniform(self, low: float, high: float) -> float:  # random.uniform: low + (high - low)·u, either order
        if not self._values:
            self._values = torch.rand(64, generator=self._generator, dtype=torch.float64).tolist()[::-1]
        return low + (high - low) * self._values.pop()

    def randint(self, low: int, high: int) -> int:  # random.randint: both ends included
        return min(low + int(self.uniform(0.0, high - low + 1)), high)


def block_mask(
    height: int,
    width: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    min_block_area: int | None = None,
    max_tries: int = 10,
) -> Tensor:
    """Block mask of iBOT on a ``height × width`` token grid (released dataset, ``pred_shape="block"``).

    Until ``ratio·H·W`` (a float budget) is reached, up to ``max_tries`` rectangles are proposed: area uniform between
    ``min_block_area`` and the remaining budget, aspect log-uniform in ``aspect``, sides ``round(sqrt(area·aspect))`` ×
    ``round(sqrt(area/aspect))`` strictly smaller than the grid, uniform position. The first proposal adding between
    1 and ``remaining`` new tokens is taken; when all ``max_tries`` fail the loop stops.

    Hence (as released) at most ``floor(ratio·H·W)`` tokens are masked, fewer when ``max_tries`` proposals in a row
    fail: 7×7 at 0.3 masks at most 14 of 14.7 (14 in ~95 % of draws), 3×3 at 0.3 at most 2; a 1-wide grid never.

    Args:
        height: Grid rows ``H`` (7 for 224-px crops on the 32-px grid, 3 for 96 px).
        width: Grid columns ``W``.
        ratio: Target share of masked tokens in [0, 1] (OpenUS ``pred_ratio`` 0.3).
        generator: Source of all draws (any device; see :class:`_Uniforms`).
        aspect: Aspect-ratio range, both positive (iBOT: ``(0.3, 1/0.3)``).
        min_block_area: Lower end of the proposed area; ``None`` = ``(min(H, W)//3)²``.
        max_tries: Proposals per block before giving up (iBOT: 10).

    Returns:
        ``(height, width)`` bool mask on the CPU, ``True`` = masked.

    Raises:
        ValueError: Non-positive grid size or ``max_tries``, ``ratio`` outside [0, 1], non-positive aspect bounds or
            a negative ``min_block_area``.
    """
    return _block_mask(height, width, ratio, _Uniforms(generator), aspect, min_block_area, max_tries)


def _block_mask(
    height: int,
    width: int,
    ratio: float,
    draws: _Uniforms,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    min_block_area: int | None = None,
    max_tries: int = 10,
) -> Tensor:
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1×1, got {height}×{width}")
    _check_fraction("ratio", ratio)
    if min_block_area is None:
        min_block_area = (min(height, width) // 3) ** 2
    if min(aspect) <= 0 or max_tries < 1 or min_block_area < 0:
        raise ValueError(
            f"need positive aspect bounds, max_tries >= 1 and min_block_area >= 0, got {aspect=}, "
            f"{max_tries=}, {min_block_area=}"
        )
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = torch.zeros(height, width, dtype=torch.bool)
    budget = ratio * height * width
    count = 0
    while count < budget:
        remaining = budget - count
        added = 0
        for _ in range(max_tries):
            area = draws.uniform(min_block_area, remaining)
            stretch = math.exp(draws.uniform(*log_aspect))
            h = round(math.sqrt(area * stretch))
            w = round(math.sqrt(area / stretch))
            if w < width and h < height:
                top, left = draws.randint(0, height - h), draws.randint(0, width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block.fill_(True)
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def block_masks(batch: int, height: int, width: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """``batch`` independent :func:`block_mask` draws with the default iBOT settings.

    Args:
        batch: Number of masks ``B`` (>= 0).
        height: Grid rows.
        width: Grid columns.
        ratio: Target share of masked tokens.
        generator: Source of all draws, consumed mask after mask.

    Returns:
        ``(B, height, width)`` bool on the CPU.

    Raises:
        ValueError: ``batch < 0`` or invalid :func:`block_mask` arguments.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    draws = _Uniforms(generator)
    masks = [_block_mask(height, width, ratio, draws) for _ in range(batch)]
    return torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
