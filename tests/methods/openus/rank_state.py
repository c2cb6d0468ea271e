"""A callback for the DDP test: every rank saves what must agree across ranks (run in the ranks' own processes)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class SaveRankState(pl.Callback):
    """At the end of ``fit``, rank r writes ``<default_root_dir>/rank_state_<r>.pt`` with the centres and weights."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            "center": pl_module.ibot_loss.center.detach().cpu(),
            "center2": pl_module.ibot_loss.center2.detach().cpu(),
            "student": {k: v.detach().cpu() for k, v in pl_module.student.state_dict().items()},
            "importance": pl_module.recon_importance.importance(1),
        }
        torch.save(state, Path(trainer.default_root_dir) / f"rank_state_{trainer.global_rank}.pt")
