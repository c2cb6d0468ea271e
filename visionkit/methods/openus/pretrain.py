"""``OpenUSPretrain``: self-adaptive masked contrastive pretraining of a VMamba (OpenUS, arXiv 2511.11510).

One training step (docs/methods/openus.md, "Training step"), for a batch of ``G`` global crops and ``V`` local crops per
image (``MultiCropDataModule``):

1. The teacher (an EMA of the student, no gradients) sees the unmasked global crops. Its SS2D scan inputs at the
   chosen stage / block are recorded on the way, and :func:`visionkit.ops.mamba_attention_map` turns them into the
   token attention map ``(G·B, L, L)``.
2. The adaptive mask of the global crops: ``masking_score`` blends the attention (per token: how much it is attended)
   with the student's reconstruction importance of the previous batch (``ReconImportance``), with weight
   ``alpha_at(epoch)``; ``adaptive_mask`` hides ``ceil(0.6 L)`` tokens, the ``top_fraction_at(epoch)`` best-scored
   ones first, the rest at random. Local crops get iBOT block masks (``pred_ratio`` of their tokens).
3. The student sees the masked crops (the VMamba mask token replaces the patch embedding at masked positions).
4. Loss = DINO CLS cross-entropy (teacher global views against every other student view) + iBOT patch cross-entropy
   on the masked tokens of the global views + masked pixel MSE of the global and the local reconstructions.
5. After the optimiser step: the EMA teacher update and the reconstruction importance of this batch (for the next).

Schedules follow the release per optimiser step: learning rate (warm-up from 0, cosine to ``min_lr``), weight decay
(cosine ``weight_decay`` → ``weight_decay_end``), teacher momentum (cosine → 1); per-parameter gradient clipping and
the last layer frozen during the first epoch. Randomness of the masks comes from a generator seeded by
``(mask_seed, global_step, rank)``, so a resumed run masks as the uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from visionkit.methods.openus.heads import IBOTHead, PixelShuffleDecoder
from visionkit.methods.openus.losses import IBOTLoss, masked_patch_error, masked_pixel_mse
from visionkit.methods.openus.masking import (
    ReconImportance,
    adaptive_mask,
    alpha_at,
    block_masks,
    masking_score,
    top_fraction_at,
)
from visionkit.methods.openus.network import OpenUSNetwork
from visionkit.methods.openus.schedules import clip_gradients_per_parameter, cosine_schedule_at, update_teacher
from visionkit.models.backbones import record_scan_inputs
from visionkit.ops import mamba_attention_map
from visionkit.tasks.base import BaseTask
from visionkit.tasks.optim import build_adamw

__all__ = ["OpenUSPretrain"]

Batch = tuple[list[Tensor], dict[str, Any]]


class OpenUSPretrain(BaseTask):
    """OpenUS pretraining: iBOT teacher–student on VMamba with the self-adaptive mask (defaults: the authors' script).

    Args:
        backbone: Registered VMamba name (``vmamba_small`` in the paper; ``vmamba_test`` for CPU tests).
        pretrained: Load the named model's registered weights (local files only).
        checkpoint_path: Initial backbone weights for student and teacher (OpenUS starts from the ImageNet-1k
            VMamba-S checkpoint; it has no ``masked_embed``, which then starts at zero).
        backbone_kwargs: Further backbone arguments (e.g. ``drop_path_rate``; the release keeps 0.3 for VMamba-S).
        out_dim: CLS output dimension of the iBOT head.
        patch_out_dim: Patch output dimension.
        head_hidden_dim: Hidden width of the head's MLP.
        head_bottleneck_dim: Bottleneck width before the weight-normalised last layer.
        norm_last_layer: Fix the last layer's weight norm at 1.
        shared_head: Student's patch tokens share the CLS last layer (release: False).
        shared_head_teacher: Teacher's patch tokens share it (release: True).
        mask_ratio: Fraction of the global crops' tokens the adaptive mask hides (0.6: 30 of 49).
        pred_ratio: Fraction of tokens in the iBOT block masks (local crops; global ones with ``mask_model="random"``).
        mask_model: Which mask the iBOT patch loss averages over: ``"atten_guided"`` (the adaptive mask; the
            authors' training script) or ``"random"`` (block masks; the README command).
        student_feedback: Blend the student's reconstruction importance into the score (release: True).
        alpha_start: α at epoch 0 (weight of the teacher attention in the code's blend).
        alpha_end: α at the last epoch.
        alpha_schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        alpha_convention: ``"code"`` (α·attention + (1 − α)·importance) or ``"paper"`` (the figure's swapped form).
        top_fraction_start: Share of tokens chosen by score at epoch 0; None: 0.1 with feedback, 0.001 without
            (release).
        top_fraction_end: Share at the last epoch.
        recon_source: ``"previous"`` (importance of the previous batch: release) or ``"current"`` (an extra
            student forward on this batch, masked by the attention alone, gives it).
        attention_mode: Mode of :func:`visionkit.ops.mamba_attention_map` (``"CwBw"`` as released; ``"CwBdtw"`` is
            the true SSM kernel, with the Δ_s factor the release leaves out).
        attention_stage: Backbone stage whose SS2D gives the attention (-1: the last).
        attention_block: Block within that stage (-1: the last; VMamba-S: block 1 of stage 4, as released).
        teacher_momentum: EMA momentum at step 0 (cosine to 1 at the last step).
        teacher_eval: Run the teacher in eval mode (no stochastic depth). Release: train mode.
        teacher_temp: Teacher CLS temperature after warm-up.
        warmup_teacher_temp: Teacher CLS temperature at epoch 0.
        teacher_patch_temp: Teacher patch temperature after warm-up.
        warmup_teacher_patch_temp: Teacher patch temperature at epoch 0.
        warmup_teacher_temp_epochs: Epochs of linear temperature warm-up.
        student_temp: Student temperature.
        center_momentum: Momentum of the CLS and patch centres.
        global_rec_loss: Add the masked pixel MSE of the global crops.
        local_rec_loss: Add the masked pixel MSE of the local crops.
        freeze_last_layer_epochs: Epochs during which the heads' last layers get no update.
        clip_grad: Per-parameter gradient-norm bound (0 disables); use this, not ``trainer.gradient_clip_val``
            (which clips one global norm).
        mask_seed: Seed of the mask generator.
        lr: Peak learning rate (after warm-up; the release does not scale it with the batch).
        min_lr: Learning rate at the end of the cosine.
        warmup_epochs: Epochs of linear warm-up from 0.
        weight_decay: Weight decay at step 0 (cosine to ``weight_decay_end``).
        weight_decay_end: Weight decay at the last step.
        betas: AdamW betas.
    """

    monitor = "train/loss"
    mode = "min"

    def __init__(
        self,
        backbone: str = "vmamba_small",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        shared_head: bool = False,
        shared_head_teacher: bool = True,
        mask_ratio: float = 0.6,
        pred_ratio: float = 0.3,
        mask_model: Literal["atten_guided", "random"] = "atten_guided",
        student_feedback: bool = True,
        alpha_start: float = 0.1,
        alpha_end: float = 0.9,
        alpha_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        alpha_convention: Literal["code", "paper"] = "code",
        top_fraction_start: float | None = None,
        top_fraction_end: float = 0.9,
        recon_source: Literal["previous", "current"] = "previous",
        attention_mode: Literal["CB", "CBdt", "CwBw", "CwBdtw", "ww"] = "CwBw",
        attention_stage: int = -1,
        attention_block: int = -1,
        teacher_momentum: float = 0.996,
        teacher_eval: bool = False,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        global_rec_loss: bool = True,
        local_rec_loss: bool = True,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        mask_seed: int = 0,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if mask_model not in ("atten_guided", "random"):
            raise ValueError(f"mask_model must be 'atten_guided' or 'random', got {mask_model!r}")
        if recon_source not in ("previous", "current"):
            raise ValueError(f"recon_source must be 'previous' or 'current', got {recon_source!r}")
        super().__init__(lr=lr, weight_decay=weight_decay, betas=betas)
        self._total_steps: int | None = None

    def configure_models(self) -> None:
        """Student (backbone with mask token + head + decoder), teacher (a copy without decoder), loss, importance."""
        hp = self.hparams
        backbone = self.build_backbone(num_classes=0, mask_token=True)
        feature_dim = int(backbone.num_features)

        def make_head(shared: bool) -> IBOTHead:
            return IBOTHead(
                feature_dim,
                out_dim=hp.out_dim,
                patch_out_dim=hp.patch_out_dim,
                hidden_dim=hp.head_hidden_dim,
                bottleneck_dim=hp.head_bottleneck_dim,
                norm_last_layer=hp.norm_last_layer,
                shared_head=shared,
            )

        self.student = OpenUSNetwork(backbone, make_head(hp.shared_head), PixelShuffleDecoder(feature_dim, stride=32))
        # The teacher starts as the student (the release loads the student's state dict into it, common names only).
        self.teacher = OpenUSNetwork(copy.deepcopy(backbone), make_head(hp.shared_head_teacher))
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        self.teacher.requires_grad_(False)
        self.ibot_loss = IBOTLoss(
            out_dim=hp.out_dim,
            patch_out_dim=hp.patch_out_dim,
            warmup_teacher_temp=hp.warmup_teacher_temp,
            teacher_temp=hp.teacher_temp,
            warmup_teacher_patch_temp=hp.warmup_teacher_patch_temp,
            teacher_patch_temp=hp.teacher_patch_temp,
            warmup_teacher_epochs=hp.warmup_teacher_temp_epochs,
            epochs=1,  # replaced by trainer.max_epochs at the start of fit
            student_temp=hp.student_temp,
            center_momentum=hp.center_momentum,
            center_momentum2=hp.center_momentum,
        )
        self.recon_importance = ReconImportance()

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone (what ``freeze_backbone`` / ``layer_decay`` would act on)."""
        return self.student.backbone

    # ------------------------------------------------------------------ schedules and optimiser

    def _epochs(self) -> int:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if max_epochs is None or max_epochs < 1:
            raise ValueError("OpenUSPretrain needs trainer.max_epochs (its schedules are defined over epochs)")
        return int(max_epochs)

    def _steps(self) -> tuple[int, int]:
        """(total optimiser steps, steps per epoch), read once from the trainer."""
        if self._total_steps is None:
            self._total_steps = int(self.trainer.estimated_stepping_batches)
        return self._total_steps, max(self._total_steps // self._epochs(), 1)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the student (biases, 1-d and ``no_weight_decay()`` parameters undecayed) and a per-step lr."""
        optimizer = build_adamw(self.parameter_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        for group in optimizer.param_groups:
            group["scheduled_weight_decay"] = group["weight_decay"] > 0
        hp = self.hparams

        def factor(step: int) -> float:
            if step == 0 and self._total_steps is None:
                # Called when the scheduler is built, before the run's length may be asked for (see BaseTask); the
                # first value does not depend on it: the warm-up starts at 0, the cosine at the peak.
                return 0.0 if hp.warmup_epochs > 0 else 1.0
            total, per_epoch = self._steps()
            return cosine_schedule_at(step, total, hp.lr, hp.min_lr, hp.warmup_epochs * per_epoch) / hp.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Give the loss the run's length (its temperature warm-up is in epochs)."""
        self.ibot_loss.epochs = self._epochs()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Set this step's weight decay on the decayed groups (cosine ``weight_decay`` → ``weight_decay_end``)."""
        total, _ = self._steps()
        value = cosine_schedule_at(self.global_step, total, self.hparams.weight_decay, self.hparams.weight_decay_end)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("scheduled_weight_decay"):
                    group["weight_decay"] = value

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-parameter gradient clipping, then no update of the heads' last layers in the first epochs."""
        if self.hparams.clip_grad > 0:
            clip_gradients_per_parameter(self.student.parameters(), self.hparams.clip_grad)
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for name, param in self.student.head.named_parameters():
                if name.startswith("last_layer"):
                    param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """EMA update of the teacher with this step's momentum (cosine from ``teacher_momentum`` to 1)."""
        total, _ = self._steps()
        momentum = cosine_schedule_at(self.global_step - 1, total, self.hparams.teacher_momentum, 1.0)
        update_teacher(self.teacher, self.student, momentum)

    def train(self, mode: bool = True) -> OpenUSPretrain:
        """Training mode for the student; the teacher follows unless ``teacher_eval``."""
        super().train(mode)
        if self.hparams.teacher_eval:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ masks

    def _generator(self, device: torch.device) -> torch.Generator:
        """The mask generator of this step and rank: a resumed run draws the same masks as an uninterrupted one."""
        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.hparams.mask_seed) * 1_000_003 + self.global_step * 1_009 + self.global_rank)
        return generator

    def teacher_attention(self, images: Tensor) -> tuple[Tensor, Any]:
        """Teacher forward of the global crops with its token attention map.

        Args:
            images: ``(G·B, 3, H, W)`` unmasked global crops.

        Returns:
            ``(attention (G·B, L, L) in [0, 1], teacher NetworkOutput)``.
        """
        hp = self.hparams
        with torch.no_grad(), record_scan_inputs(self.teacher.backbone, hp.attention_stage, hp.attention_block) as rec:
            output = self.teacher(images)
        if not rec:
            raise RuntimeError("the teacher's forward recorded no SS2D scan inputs")
        record = rec[-1]
        attention = mamba_attention_map(
            record.delta,
            record.A,
            record.B,
            record.C,
            height=record.height,
            width=record.width,
            delta_bias=record.delta_bias,
            mode=hp.attention_mode,
        )
        return attention, output

    def adaptive_global_mask(
        self, attention: Tensor, importance: Tensor | None, grid: tuple[int, int], generator: torch.Generator
    ) -> Tensor:
        """The self-adaptive token mask ``(N, h, w)`` of the global crops for this epoch."""
        hp = self.hparams
        epochs, epoch = self._epochs(), self.current_epoch
        start = hp.top_fraction_start
        if start is None:
            start = 0.1 if hp.student_feedback else 0.001
        if not hp.student_feedback:
            importance = None
        alpha = alpha_at(epoch, epochs, hp.alpha_start, hp.alpha_end, schedule=hp.alpha_schedule)
        score = masking_score(attention, importance, alpha, convention=hp.alpha_convention)
        top_fraction = top_fraction_at(epoch, epochs, start, hp.top_fraction_end)
        mask = adaptive_mask(score, hp.mask_ratio, top_fraction, generator=generator)
        return mask.view(-1, *grid)

    # ------------------------------------------------------------------ step

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One OpenUS step on ``(crops, targets)``: ``G`` global crops first, then the local ones."""
        crops, _ = batch
        num_global = self.ibot_loss.num_global
        if len(crops) < num_global:
            raise ValueError(f"OpenUSPretrain needs at least {num_global} global crops per image, got {len(crops)}")
        hp = self.hparams
        global_images = torch.cat(list(crops[:num_global]))
        generator = self._generator(global_images.device)
        attention, teacher_out = self.teacher_attention(global_images)
        grid = tuple(teacher_out.feature_map.shape[-2:])
        random_global = block_masks(global_images.shape[0], *grid, hp.pred_ratio, generator=generator)
        random_global = random_global.to(global_images.device)
        importance = None
        if hp.recon_source == "current" and hp.student_feedback:
            importance = self._current_importance(global_images, attention, grid, generator)
        elif self.recon_importance.has_importance:
            importance = self.recon_importance.importance(global_images.shape[0])
        global_mask = self.adaptive_global_mask(attention, importance, grid, generator)

        student_global = self.student(global_images, global_mask, reconstruct=True)
        cls_logits = [student_global.cls_logits]
        losses: dict[str, Tensor] = {}
        if hp.global_rec_loss:
            losses["rec_global"] = masked_pixel_mse(global_images, student_global.reconstruction, global_mask)
        if len(crops) > num_global:
            local_images = torch.cat(list(crops[num_global:]))
            with torch.no_grad():
                local_grid = self.student.feature_map(local_images[:1]).shape[-2:]
            local_mask = block_masks(local_images.shape[0], *local_grid, hp.pred_ratio, generator=generator)
            local_mask = local_mask.to(local_images.device)
            student_local = self.student(local_images, local_mask, reconstruct=hp.local_rec_loss)
            cls_logits.append(student_local.cls_logits)
            if hp.local_rec_loss:
                losses["rec_local"] = masked_pixel_mse(local_images, student_local.reconstruction, local_mask)
        patch_mask = global_mask if hp.mask_model == "atten_guided" else random_global
        ibot = self.ibot_loss(
            torch.cat(cls_logits),
            student_global.patch_logits,
            teacher_out.cls_logits,
            teacher_out.patch_logits,
            patch_mask.flatten(1),
            self.current_epoch,
        )
        losses["cls"], losses["patch"] = ibot["cls"], ibot["patch"]
        loss = sum(losses.values())
        if hp.recon_source == "previous":
            with torch.no_grad():
                self.recon_importance.update(
                    masked_patch_error(global_images, student_global.reconstruction.detach(), global_mask)
                )
        batch_size = crops[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/masked_tokens", global_mask.flatten(1).sum(1).float().mean(), batch_size=batch_size)
        return loss

    def _current_importance(
        self, images: Tensor, attention: Tensor, grid: tuple[int, int], generator: torch.Generator
    ) -> Tensor:
        """``recon_source="current"``: importance from this batch, under the attention-only mask (no gradients)."""
        provisional = self.adaptive_global_mask(attention, None, grid, generator)
        with torch.no_grad():
            output = self.student(images, provisional, reconstruct=True)
            error = masked_patch_error(images, output.reconstruction, provisional)
        return error.flatten(2)
