"""The LightningCLI end to end on the demo classification set: fit, resume, validate, saved config, checkpoints."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from visionkit.cli import main
from visionkit.tasks.callbacks import checkpoint_problem
from visionkit.utils.io import _host_tag

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


# ------------------------------------------------------------------------------------- damaged or missing checkpoints
def _damage(path: Path, how: str, original: bytes) -> None:
    if how == "truncated":
        path.write_bytes(original[: len(original) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # "flipped": a run of bytes inside a tensor overwritten; torch.load alone would not notice
        data = bytearray(original)
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))


def test_damaged_last_checkpoint_is_one_clear_error_that_lists_intact_ones(tmp_path, classification_root):
    main(_fit_args(tmp_path, classification_root, 1))
    folder = tmp_path / "checkpoints"
    last, (epoch_ckpt,) = folder / "last.ckpt", list(folder.glob("epoch=*.ckpt"))
    original = last.read_bytes()
    (folder / "epoch=7-step=99.ckpt").write_bytes(original[:1000])  # damaged too: must not be offered
    reasons = {
        "truncated": "it is truncated or not a PyTorch checkpoint",
        "garbage": "it is truncated or not a PyTorch checkpoint",
        "empty": "the file is empty (0 bytes)",
        "flipped": "its zip archive is damaged (BadZipFile: Bad CRC-32",  # torch.load alone would load it
    }
    for how, reason in reasons.items():
        _damage(last, how, original)
        with pytest.raises(SystemExit) as exit_info:
            main(_fit_args(tmp_path, classification_root, 2, "--ckpt_path=last"))
        message = str(exit_info.value.code)  # SystemExit(str): printed on stderr, exit status 1
        assert message.startswith(f"visionkit fit: cannot resume from the checkpoint {last}: {reason}"), message
        assert f"you could resume from instead:\n  {epoch_ckpt}\ne.g. --ckpt_path={epoch_ckpt}" in message, how
        assert "epoch=7-step=99" not in message and "Traceback" not in message
    # From the command line: exit status 1, the message and no traceback on stderr.
    _damage(last, "truncated", original)
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *_fit_args(tmp_path, classification_root, 2)[1:],
         "--ckpt_path=last"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"cannot resume from the checkpoint {last}: it is truncated" in out.stderr
    assert "Traceback" not in out.stderr
    # The intact one named in the message does resume.
    resumed = main(_fit_args(tmp_path, classification_root, 2, f"--ckpt_path={epoch_ckpt}"))
    assert resumed.trainer.current_epoch == 2
    # Lightning writes the new "last" beside the damaged file (last-v1.ckpt); `--ckpt_path last` takes the newest.
    newest_last = max(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert checkpoint_problem(newest_last) is None
    assert torch.load(newest_last, map_location="cpu", weights_only=True)["epoch"] == 1


def test_ckpt_path_last_without_a_checkpoint_says_so_in_one_line(tmp_path, classification_root, capsys, recwarn):
    cli = main(_fit_args(tmp_path, classification_root, 1, "--ckpt_path=last"))
    assert cli.trainer.current_epoch == 1
    err = capsys.readouterr().err
    folder = os.path.realpath(tmp_path / "checkpoints")
    expected = f"visionkit fit: --ckpt_path last: no last.ckpt in {folder} yet; training starts from scratch."
    assert expected in err.splitlines()
    assert not [w for w in recwarn if "ckpt_path" in str(w.message)]  # no Lightning warning on top of it
    # Evaluating "last" when there is none is an error, not a silent evaluation of random weights.
    with pytest.raises(SystemExit, match=r"visionkit validate: --ckpt_path last: there is no last.ckpt in .*"):
        main(["validate", *_fit_args(tmp_path / "other", classification_root, 1)[1:], "--ckpt_path=last"])


_KILLED_SAVE = """
import io, sys, time
import torch
import visionkit.weights
from visionkit.tasks.callbacks import AtomicCheckpointIO

marker, target = sys.argv[1], sys.argv[2]

def write_half_then_hang(obj, tmp):  # the real bytes of the checkpoint, cut off where a SIGKILL will strike
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(tmp, "wb") as file:
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
    open(marker, "w").close()
    time.sleep(600)

visionkit.weights._torch_save_to = write_half_then_hang
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(512, 512)}}, target)
"""


def test_leftover_of_a_killed_checkpoint_save_is_removed_by_the_next_save(tmp_path, classification_root):
    main(_fit_args(tmp_path, classification_root, 1))
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    before = last.read_bytes()
    marker = tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(marker), str(last)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not reach its write"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=60)
    leftovers = [
        p
        for p in folder.iterdir()
        if re.fullmatch(rf"\.last\.ckpt\.{_host_tag()}-{writer.pid}\.[0-9a-f]{{12}}\.tmp", p.name)
    ]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1 << 19
    assert last.read_bytes() == before  # the interrupted save never touched last.ckpt
    resumed = main(_fit_args(tmp_path, classification_root, 2, "--ckpt_path=last"))  # its next save cleans up
    assert resumed.trainer.current_epoch == 2
    assert not list(folder.glob(".*.tmp")), sorted(p.name for p in folder.iterdir())
    assert checkpoint_problem(last) is None
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1


def test_skip_unreadable_run_resumes_exactly(tmp_path, classification_root, interrupted_fit):
    data = tmp_path / "data"
    shutil.copytree(classification_root, data)
    for path in sorted((data / "train").rglob("*.png"))[1:8:5]:  # two training images cut short
        path.write_bytes(path.read_bytes()[:200])
    args = ("--data.skip_unreadable=true", "--data.num_workers=2")
    with pytest.warns(UserWarning, match=r"epoch 1: 2 of 12 training images could not be read"):
        main(_fit_args(tmp_path / "straight", data, 2, *args))
    interrupted_fit(_fit_args(tmp_path / "resumed", data, 2, *args), epochs=1)
    main(_fit_args(tmp_path / "resumed", data, 2, *args, "--ckpt_path=last"))
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
