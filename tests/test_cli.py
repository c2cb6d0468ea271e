"""The LightningCLI end to end on the demo classification set: fit, resume, validate, saved config, checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from visionkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def _fit_args(root: Path, data_root: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--model=ClassificationTask",
        "--model.backbone=test_resnet",
        "--model.num_classes=3",
        "--model.lr=0.005",
        "--model.warmup_steps=2",
        "--data=ImageFolderDataModule",
        f"--data.data_root={data_root}",
        "--data.image_size=32",
        "--data.batch_size=8",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def classification_root(demo_root: Path) -> Path:
    return demo_root / "classification"


def test_fit_writes_config_logs_and_weights_only_checkpoints(tmp_path, classification_root):
    cli = main(_fit_args(tmp_path, classification_root, 1))
    assert cli.trainer.current_epoch == 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # Loadable with weights_only=True: no modules or callables in the hyper-parameters.
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "test_resnet"
    config = yaml.safe_load((tmp_path / "logs" / "version_0" / "config.yaml").read_text())
    assert config["seed_everything"] == 0
    assert config["model"]["class_path"] == "visionkit.tasks.ClassificationTask"
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/top1"} <= set(metrics)
    assert not list((tmp_path / "checkpoints").glob("*.tmp*")), "no temporary checkpoint files may be left behind"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_last_gives_the_same_weights_as_an_uninterrupted_run(
    tmp_path, classification_root, num_workers, interrupted_fit
):
    workers = f"--data.num_workers={num_workers}"
    main(_fit_args(tmp_path / "straight", classification_root, 2, workers))
    interrupted_fit(_fit_args(tmp_path / "resumed", classification_root, 2, workers), epochs=1)
    main(_fit_args(tmp_path / "resumed", classification_root, 2, workers, "--ckpt_path=last"))
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    # and the run really trained: the weights moved away from the epoch-1 state
    first = main(_fit_args(tmp_path / "one", classification_root, 1))
    assert first.trainer.current_epoch == 1
    one = _weights(tmp_path / "one" / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(one[k], straight[k]) for k in straight if straight[k].is_floating_point())


def test_same_seed_same_result(tmp_path, classification_root):
    main(_fit_args(tmp_path / "a", classification_root, 1))
    main(_fit_args(tmp_path / "b", classification_root, 1))
    a, b = (_weights(tmp_path / r / "checkpoints" / "last.ckpt") for r in "ab")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_eval_tool_validates_a_checkpoint(tmp_path, classification_root):
    main(_fit_args(tmp_path, classification_root, 1))
    args = _fit_args(tmp_path, classification_root, 1)[1:]
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval.py"), "validate", *args, "--ckpt_path=last"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/top1" in out.stdout


def test_train_tool_refuses_other_subcommands():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "validate"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "use tools/eval.py" in out.stderr


def test_unknown_option_is_a_clear_cli_error(tmp_path, classification_root, capsys):
    with pytest.raises(SystemExit):
        main([*_fit_args(tmp_path, classification_root, 1), "--model.not_an_option=3"])
    assert "not_an_option" in capsys.readouterr().err


def test_command_line_overrides_win_over_checkpoint_hyperparameters(tmp_path, classification_root):
    main(_fit_args(tmp_path, classification_root, 1))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    args = ["validate", *_fit_args(tmp_path, classification_root, 1)[1:], f"--ckpt_path={ckpt}", "--model.lr=0.123"]
    cli = main(args)
    assert cli.model.hparams.lr == 0.123
    assert cli.trainer.callback_metrics["val/top1"] >= 0
