"""ExpertUsageCallback: usage entropy, heat maps, and a short Lightning fit that logs and writes them."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from visionkit.methods.modsquad import ExpertUsageCallback, attach_routing_stats, mutual_information_total
from visionkit.methods.modsquad.callbacks import usage_entropy, usage_heatmap


def test_usage_entropy_hand_worked() -> None:
    usage = torch.tensor([[25.0, 25.0, 25.0, 25.0], [100.0, 0.0, 0.0, 0.0], [50.0, 50.0, 0.0, 0.0], [0.0] * 4])
    entropy = usage_entropy(usage)
    assert entropy[:3].tolist() == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-6)
    assert math.isnan(entropy[3].item())  # a task never seen


def test_usage_heatmap_size_and_row_scaling() -> None:
    image = usage_heatmap(torch.tensor([[10.0, 90.0, 0.0], [30.0, 30.0, 40.0]]), cell=4)
    assert image.size == (12, 8)
    pixels = torch.from_numpy(np.asarray(image).copy())
    assert pixels.shape == (8, 12, 3)
    assert torch.equal(pixels[0, 4], torch.tensor([253, 231, 37]))  # the row maximum is yellow
    assert torch.equal(pixels[4, 8], torch.tensor([253, 231, 37]))
    assert usage_heatmap(torch.ones(2, 3), title="layer").size[1] > 2 * 12


class TwoTaskModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        attach_routing_stats(model)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = sum(self.model(x, task).square().mean() for task in range(self.model.num_tasks))
        return loss + mutual_information_total(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow  # a Lightning fit
def test_callback_logs_entropies_and_writes_one_png_per_layer(toy_model_cls, tmp_path: Path) -> None:
    module = TwoTaskModule(toy_model_cls())
    data = DataLoader(TensorDataset(torch.randn(4, 3, 8)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExpertUsageCallback(every_n_epochs=2, out_dir=tmp_path)],
    )
    trainer.fit(module, data)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "epoch_001/model.attn.png",
        "epoch_001/model.mlp.png",
    ]
    assert Image.open(tmp_path / "epoch_001/model.mlp.png").width == 8 * 12
    for task in ("a", "b"):
        entropy = trainer.callback_metrics[f"expert_usage/entropy/{task}"].item()
        assert 0.0 < entropy <= math.log(8)
