"""OpenUS losses: iBOT's CLS + masked-patch self-distillation and the masked pixel reconstruction.

Released behaviour (``XZheng0427/OpenUS`` at ``6b9f6d2``; ``docs/methods/openus.md`` §4):

* :class:`IBOTLoss` is ``iBOTLoss`` of ``main_openus.py`` (iBOT's). Teacher distributions are centred and sharpened
  softmaxes, detached; the student's are log-softmaxes at temperature 0.1. ``L_cls`` averages the cross-entropy over
  all pairs (teacher global view ``q``, student view ``v ≠ q``); ``L_patch`` is the per-token cross-entropy for
  ``v = q``, averaged over the masked tokens of each image (``Σ(loss·mask) / max(Σmask, 1)``), then over the batch and
  the global views. The centres are EMAs of the teacher outputs (batch means, all-reduced over processes), updated
  after the loss. visionkit all-reduces only when ``torch.distributed`` runs with more than one process (the release
  always calls ``dist.all_reduce``).
* :func:`masked_pixel_mse` is the backbone's SimMIM-style reconstruction loss and :func:`masked_patch_error` the
  per-patch error behind the reconstruction importance (``docs/methods/openus.md`` §4, §6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from visionkit.utils.distributed import get_world_size

__all__ = ["IBOTLoss", "masked_patch_error", "masked_pixel_mse"]


def _linspace_at(start: float, end: float, num: int, index: int) -> float:
    """``numpy.linspace(start, end, num)[index]`` (the release builds its schedules with numpy)."""
    if index == num - 1:
        return end
    return index * ((end - start) / (num - 1)) + start


class IBOTLoss(nn.Module):
    """DINO CLS loss + iBOT masked-patch loss with centring (released ``iBOTLoss``).

    Teacher temperatures: linear from the warm-up value to the final one over ``warmup_teacher_epochs`` epochs (numpy
    ``linspace``, so the final value is reached at epoch ``warmup - 1``), then constant; the patch schedule is held at
    its warm-up value for ``mim_start_epoch`` epochs first. Valid epochs are ``[0, epochs)``; when the warm-up is
    longer than the run the schedule is its first ``epochs`` entries (the release cannot be built then).
    ``epochs`` is a plain attribute and may be set after construction.

    Buffers: ``center`` ``(1, out_dim)`` and ``center2`` ``(1, 1, patch_out_dim)``, zero-initialised, persistent (the
    release's names; it saves them in ``ibot_loss``).

    Args:
        out_dim: CLS logits size.
        patch_out_dim: Patch logits size.
        num_global: Global crops ``G`` (teacher views), at least 1.
        num_local: Local crops per image expected (release ``nlcrops``, 8). :meth:`forward` reads the actual number of
            student views from ``student_cls`` (``rows / B``), so runs with another number of local crops work too.
        warmup_teacher_temp: CLS teacher temperature at epoch 0.
        teacher_temp: CLS teacher temperature after the warm-up.
        warmup_teacher_patch_temp: Patch teacher temperature at epoch 0.
        teacher_patch_temp: Patch teacher temperature after the warm-up.
        warmup_teacher_epochs: Warm-up length in epochs (>= 1).
        epochs: Training length in epochs (>= 1).
        student_temp: Student temperature.
        center_momentum: EMA momentum of ``center``.
        center_momentum2: EMA momentum of ``center2``.
        lambda1: Weight of ``L_cls``.
        lambda2: Weight of ``L_patch`` (the release's class default is 0, its training script passes 1).
        mim_start_epoch: Epochs before the patch temperature warm-up starts (release ``pred_start_epoch``, 0).

    Raises:
        ValueError: Inconsistent sizes or epoch counts.
    """

    center: Tensor
    center2: Tensor

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        num_global: int = 2,
        num_local: int = 8,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_epochs: int = 30,
        epochs: int = 151,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        mim_start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if out_dim < 1 or patch_out_dim < 1:
            raise ValueError(f"out_dim and patch_out_dim must be positive, got {out_dim} and {patch_out_dim}")
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global=}, {num_local=}")
        if warmup_teacher_epochs < 1 or epochs < 1 or mim_start_epoch < 0:
            raise ValueError(f"invalid epoch counts: {warmup_teacher_epochs=}, {epochs=}, {mim_start_epoch=}")
        self.num_global = num_global
        self.num_local = num_local
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_patch_temp = warmup_teacher_patch_temp
        self.teacher_patch_temp = teacher_patch_temp
        self.warmup_teacher_epochs = warmup_teacher_epochs
        self.epochs = epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.mim_start_epoch = mim_start_epoch
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))

    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        """Teacher temperatures ``(CLS, patch)`` at an epoch.

        Args:
            epoch: Epoch in ``[0, epochs)``.

        Returns:
            The two temperatures.

        Raises:
            ValueError: ``epoch`` outside ``[0, epochs)``.
        """
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must be in [0, epochs={self.epochs}), got {epoch}")
        warmup = self.warmup_teacher_epochs
        temp = self.teacher_temp
        if epoch < warmup:
            temp = _linspace_at(self.warmup_teacher_temp, self.teacher_temp, warmup, epoch)
        patch_epoch = epoch - self.mim_start_epoch
        temp2 = self.teacher_patch_temp
        if patch_epoch < 0:
            temp2 = self.warmup_teacher_patch_temp
        elif patch_epoch < warmup:
            temp2 = _linspace_at(self.warmup_teacher_patch_temp, self.teacher_patch_temp, warmup, patch_epoch)
        return temp, temp2

    def forward(
        self,
        student_cls: Tensor,
        student_patch: Tensor,
        teacher_cls: Tensor,
        teacher_patch: Tensor,
        student_masks: Tensor | Sequence[Tensor],
        epoch: int,
    ) -> dict[str, Tensor]:
        """Compute the losses and then update the centres.

        Crops are concatenated along the batch, view after view, global crops first (``B`` images per view).

        Args:
            student_cls: ``(V·B, out_dim)`` student CLS logits of all ``V >= max(G, 2)`` views (``G + num_local``).
            student_patch: ``(G·B, L, patch_out_dim)`` student patch logits of the (masked) global views.
            teacher_cls: ``(G·B, out_dim)`` teacher CLS logits of the global views (gradients are not used).
            teacher_patch: ``(G·B, L, patch_out_dim)`` teacher patch logits of the unmasked global views.
            student_masks: The global views' token masks, ``True`` = masked: ``(G·B, h, w)`` or ``(G·B, L)``, or a
                sequence of ``G`` such tensors with ``B`` rows each.
            epoch: Current epoch (teacher temperatures).

        Returns:
            ``{"cls": λ1·L_cls, "patch": λ2·L_patch, "loss": their sum}``, scalars.

        Raises:
            ValueError: Shapes are inconsistent with each other or with ``num_global`` / ``num_local``.
        """
        masks = torch.cat(list(student_masks)) if not isinstance(student_masks, Tensor) else student_masks
        num_global = self.num_global
        if teacher_cls.ndim != 2 or teacher_cls.shape[0] % num_global or teacher_cls.shape[0] == 0:
            raise ValueError(f"teacher_cls must be (G·B, out_dim) with G={num_global}, got {tuple(teacher_cls.shape)}")
        batch = teacher_cls.shape[0] // num_global
        views = student_cls.shape[0] // batch if student_cls.ndim == 2 else 0
        if student_cls.shape != (views * batch, teacher_cls.shape[1]) or views < max(num_global, 2):
            raise ValueError(
                f"student_cls must be (V·{batch}, {teacher_cls.shape[1]}): V >= max(G={num_global}, 2) views of "
                f"{batch} images, global first, got {tuple(student_cls.shape)}"
            )
        if student_patch.ndim != 3 or teacher_patch.shape != student_patch.shape:
            raise ValueError(
                "student_patch and teacher_patch must both be (G·B, L, patch_out_dim), got "
                f"{tuple(student_patch.shape)} and {tuple(teacher_patch.shape)}"
            )
        masks = masks.reshape(masks.shape[0], -1) if masks.ndim >= 2 else masks
        if student_patch.shape[0] != num_global * batch or masks.shape != student_patch.shape[:2]:
            raise ValueError(
                f"need {num_global * batch} global rows and masks of {tuple(student_patch.shape[:2])} tokens, got "
                f"student_patch {tuple(student_patch.shape)} and masks {tuple(masks.shape)}"
            )
        temp, temp2 = self.teacher_temperatures(epoch)

        student_log = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).view(views, batch, -1)
        teacher_prob = F.softmax((teacher_cls.detach().float() - self.center) / temp, dim=-1)
        teacher_prob = teacher_prob.view(num_global, batch, -1)
        # pair_ce[q, v]: batch-mean cross-entropy between teacher view q and student view v.
        pair_ce = -torch.einsum("qbd,vbd->qv", teacher_prob, student_log) / batch
        other_view = ~torch.eye(num_global, views, dtype=torch.bool, device=pair_ce.device)
        cls_loss = pair_ce[other_view].mean()

        patch_log = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        patch_prob = F.softmax((teacher_patch.detach().float() - self.center2) / temp2, dim=-1)
        token_ce = -(patch_prob * patch_log).sum(dim=-1)
        weights = masks.to(token_ce.dtype)
        per_image = (token_ce * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)
        patch_loss = per_image.mean()  # mean over the batch, then over the G views (equal sizes)

        losses = {"cls": cls_loss * self.lambda1, "patch": patch_loss * self.lambda2}
        losses["loss"] = losses["cls"] + losses["patch"]
        self.update_center(teacher_cls, teacher_patch)
        return losses

    @torch.no_grad()
    def update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMA update of the centres with the batch means of the teacher outputs over all processes.

        ``center ← m·center + (1 - m)·mean(teacher_cls)`` and ``center2 ← m2·center2 + (1 - m2)·mean over images of
        the per-image token mean of teacher_patch``; the sums are all-reduced and divided by ``rows·world_size``
        when more than one process runs.

        Args:
            teacher_cls: ``(N, out_dim)`` teacher CLS logits.
            teacher_patch: ``(N, L, patch_out_dim)`` teacher patch logits.
        """
        out_dim = self.center.shape[-1]
        sums = torch.cat([teacher_cls.float().sum(dim=0), teacher_patch.float().mean(dim=1).sum(dim=0)])
        world = get_world_size()
        if world > 1:
            dist.all_reduce(sums)
        cls_center = sums[:out_dim] / (teacher_cls.shape[0] * world)
        patch_center = sums[out_dim:] / (teacher_patch.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(cls_center.view_as(self.center), alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_(
            patch_center.view_as(self.center2), alpha=1 - self.center_momentum2
        )


def _pixel_weights(images: Tensor, reconstruction: Tensor, token_mask: Tensor) -> Tensor:
    """Token mask ``(B, h, w)`` repeated to a ``(B, 1, H, W)`` float pixel mask, after checking the shapes."""
    if images.ndim != 4 or reconstruction.shape != images.shape:
        raise ValueError(
            f"images and reconstruction must both be (B, C, H, W), got {tuple(images.shape)} and "
            f"{tuple(reconstruction.shape)}"
        )
    batch, _, height, width = images.shape
    if token_mask.ndim != 3 or token_mask.shape[0] != batch:
        raise ValueError(f"token_mask must be (B={batch}, h, w), got {tuple(token_mask.shape)}")
    rows, cols = token_mask.shape[1:]
    if rows == 0 or cols == 0 or height % rows or width % cols:
        raise ValueError(f"the {rows}×{cols} token grid must divide the {height}×{width} image")
    pixels = token_mask.repeat_interleave(height // rows, dim=1).repeat_interleave(width // cols, dim=2)
    return pixels.unsqueeze(1).float()


def masked_pixel_mse(images: Tensor, reconstruction: Tensor, token_mask: Tensor) -> Tensor:
    """Mean squared error on the masked pixels (SimMIM normalisation, as released).

    ``Σ((x - x̂)²·M) / (ΣM + 1e-5) / C`` with ``M`` the ``(B, 1, H, W)`` pixel mask (one channel), i.e. the mean over
    the masked pixels of all ``C`` channels. Pixels are compared in the (ImageNet-normalised) input space, without
    per-patch normalisation. Computed in float32.

    Args:
        images: ``(B, C, H, W)`` target images.
        reconstruction: ``(B, C, H, W)`` decoder output.
        token_mask: ``(B, h, w)`` token mask (bool or 0/1), ``True`` = masked; ``h`` divides ``H``, ``w`` divides ``W``.

    Returns:
        Scalar loss (0 when nothing is masked).

    Raises:
        ValueError: Shapes are inconsistent.
    """
    weights = _pixel_weights(images, reconstruction, token_mask)
    squared = (reconstruction.float() - images.float()).pow(2)
    return (squared * weights).sum() / (weights.sum() + 1e-5) / images.shape[1]


def masked_patch_error(images: Tensor, reconstruction: Tensor, token_mask: Tensor) -> Tensor:
    """Per-patch, per-channel mean of the masked squared pixel error (input of ``ReconImportance.update``).

    ``avg_pool2d((x - x̂)²·M)`` over the ``(H/h) × (W/w)`` pixel patches: a masked patch gets its mean squared error,
    an unmasked one 0. Computed in float32; not detached.

    Args:
        images: ``(B, C, H, W)`` target images.
        reconstruction: ``(B, C, H, W)`` decoder output.
        token_mask: ``(B, h, w)`` token mask, ``True`` = masked.

    Returns:
        ``(B, C, h, w)`` errors.

    Raises:
        ValueError: Shapes are inconsistent.
    """
    weights = _pixel_weights(images, reconstruction, token_mask)
    squared = (reconstruction.float() - images.float()).pow(2) * weights
    patch = (images.shape[2] // token_mask.shape[1], images.shape[3] // token_mask.shape[2])
    return F.avg_pool2d(squared, kernel_size=patch, stride=patch)
