"""tools/openus_masks.py: the figure (one row per image), the masks it draws, its defaults and its bad-input exits."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from tests.tools.tool_module import TOOLS, load_tool
from visionkit.data.multicrop import collate_multicrop
from visionkit.methods.openus import OpenUSPretrain
from visionkit.viz import with_caption

TINY = {
    "backbone": "vmamba_test",
    "out_dim": 64,
    "patch_out_dim": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
}
SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A one-step OpenUS run saved as the CLI lays it out, and three images (RGB, grey, RGBA; different sizes)."""
    root = tmp_path_factory.mktemp("openus_masks")
    torch.manual_seed(0)
    model = OpenUSPretrain(**TINY, warmup_epochs=0)
    sample = ([torch.randn(3, 64, 64), torch.randn(3, 64, 64), torch.randn(3, 32, 32), torch.randn(3, 32, 32)], {})
    loader = DataLoader([sample, sample], batch_size=2, collate_fn=collate_multicrop)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, loader)
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_config = root / "run" / "logs" / "version_0" / "config.yaml"
    saved_config.parent.mkdir(parents=True)
    saved_config.write_text(yaml.safe_dump({"trainer": {"max_epochs": 10}, "model": {"init_args": TINY}}))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(images / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (100, 70, 4), dtype=np.uint8), mode="RGBA").save(images / "c.png")
    (images / "notes.txt").write_text("not an image")  # skipped by its extension
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_epochs": 5},
                "model": {"class_path": "visionkit.methods.openus.OpenUSPretrain", "init_args": TINY},
            }
        )
    )
    return {"ckpt": ckpt, "images": images, "config": config, "root": root}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_writes_one_row_per_image(run, tmp_path):
    out = tmp_path / "figs" / "masks.png"
    common = ["--ckpt", str(run["ckpt"]), "--images", str(run["images"]), "--size", str(SIZE)]
    done = subprocess.run(
        [sys.executable, str(TOOLS / "openus_masks.py"), *common, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert list(out.parent.iterdir()) == [out]  # written atomically: no temporary left
    with Image.open(out) as figure:
        three_rows = figure.size
    assert three_rows[0] == 3 * (SIZE + 2) + 2  # image | attention | mask, image_grid's 2-px padding

    two = tmp_path / "two.png"
    assert load_tool("openus_masks").main([*common, "--out", str(two), "--max-images", "2"]) == 0
    with Image.open(two) as figure:
        two_rows = figure.size
    panel = with_caption(Image.new("RGB", (SIZE, SIZE)), "x", position="bottom", max_lines=1)
    assert two_rows[0] == three_rows[0]
    assert three_rows[1] - two_rows[1] == panel.height + 2  # one more row, same title


def test_masks_hide_ceil_ratio_tokens_as_training_does(run):
    tool = load_tool("openus_masks")
    loaded = tool.load_model(run["ckpt"], None)
    assert loaded.epoch == 1 and loaded.max_epochs == 10  # from the checkpoint and the run's saved config
    images = torch.stack([tool.prepare_image(path, 128)[1] for path in tool.image_paths([run["images"]])])
    assert images.shape == (3, 3, 128, 128)
    length = (128 // 32) ** 2
    for epoch, num_top in ((0, math.floor(0.1 * length)), (10, math.ceil(0.6 * length))):
        masks = tool.compute_masks(loaded.model, images, epoch, 10, torch.Generator().manual_seed(0))
        assert masks.masked.shape == masks.top.shape == masks.attended.shape == (3, 4, 4)
        assert masks.masked.flatten(1).sum(1).tolist() == [math.ceil(0.6 * length)] * 3
        assert masks.top.flatten(1).sum(1).tolist() == [num_top] * 3
        assert not (masks.top & ~masks.masked).any()  # score-chosen tokens are masked tokens
        low, high = masks.attended.flatten(1).aminmax(dim=1)
        assert torch.allclose(low, torch.zeros(3)) and torch.allclose(high, torch.ones(3))  # min-max per image
        # Top-scored tokens have the highest attended scores of their image.
        for scores, top in zip(masks.attended.flatten(1), masks.top.flatten(1), strict=True):
            assert scores[top].min() >= scores[~top].max()

    # Epoch 0 is the mask of the training code's first iteration (no reconstruction importance yet).
    model = loaded.model
    model._epochs = lambda: 10
    attention, _ = model.teacher_attention(images)
    expected = model.adaptive_global_mask(attention, None, (4, 4), torch.Generator().manual_seed(0))
    masks = tool.compute_masks(model, images, 0, 10, torch.Generator().manual_seed(0))
    assert torch.equal(masks.masked, expected)


def test_config_without_checkpoint_shows_an_untrained_model(run, tmp_path):
    tool = load_tool("openus_masks")
    loaded = tool.load_model(None, run["config"], seed=3)
    assert loaded.epoch is None and loaded.max_epochs == 5
    assert "UNTRAINED" in loaded.description and "randomly initialised" in loaded.description
    out = tmp_path / "untrained.png"
    image = str(run["images"] / "a.png")
    assert tool.main(["--config", str(run["config"]), "--images", image, "--out", str(out), "--size", "64"]) == 0
    with Image.open(out) as figure:
        assert figure.width == 3 * (SIZE + 2) + 2


def test_bad_input_exits_2_with_one_line_naming_the_file(run, tmp_path, capsys):
    tool = load_tool("openus_masks")
    out = tmp_path / "m.png"
    images = ["--images", str(run["images"])]

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert tool.main(["--ckpt", str(run["ckpt"]), "--images", str(broken), "--out", str(out)]) == 2
    assert "broken.png" in _one_line_error(capsys)

    missing = tmp_path / "nowhere" / "last.ckpt"
    assert tool.main(["--ckpt", str(missing), *images, "--out", str(out)]) == 2
    assert str(missing) in _one_line_error(capsys)

    assert tool.main(["--ckpt", str(run["ckpt"]), "--images", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "none.png" in _one_line_error(capsys)

    assert tool.main([*images, "--out", str(out)]) == 2
    assert "--ckpt" in _one_line_error(capsys)

    lone = tmp_path / "lone.ckpt"  # no run config next to it: a later epoch needs --epochs
    lone.write_bytes(run["ckpt"].read_bytes())
    assert tool.main(["--ckpt", str(lone), *images, "--out", str(out), "--epoch", "3"]) == 2
    assert "--epochs" in _one_line_error(capsys)
    assert not out.exists()

    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--ckpt", str(run["ckpt"]), *images, "--out", str(out), "--size", "100"])
    assert exit_info.value.code == 2
    assert "multiple of 32" in capsys.readouterr().err
