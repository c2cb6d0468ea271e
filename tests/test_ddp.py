"""DDP on CPU: two processes (gloo) run ``tools/train.py fit`` (or ``tools/eval.py``) to the end, evaluation gathered on
rank 0.

Lightning's ``ddp`` strategy starts the second rank by re-running the same command in a subprocess, so the run is
itself started as a subprocess with a timeout: a hang (a collective that one rank never reaches) fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _run_ddp(config: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "tools" / "train.py"),
        "fit",
        f"--config={config}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--data.num_workers=0",
        *overrides,
    ]
    # One thread per rank: two ranks share the CI machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root, env=env)


def _metrics(root: Path) -> dict[str, list[str]]:
    """Columns of the CSV logger's metrics file, non-empty values only."""
    with (root / "logs" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {key: [row[key] for row in rows if row[key]] for key in rows[0]}


def _assert_both_ranks_finished(out: subprocess.CompletedProcess) -> None:
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]


def _config_for(task_class: str, data_class: str) -> Path:
    """The first config under configs/tasks/ training ``task_class`` on demo data of ``data_class``."""
    for path in sorted((REPO / "configs" / "tasks").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model, data = config.get("model") or {}, config.get("data") or {}
        root = str((data.get("init_args") or {}).get("data_root", ""))
        model_class = str(model.get("class_path", "")).rsplit(".", 1)[-1]
        data_class_name = str(data.get("class_path", "")).rsplit(".", 1)[-1]
        if model_class == task_class and data_class_name == data_class and "demo" in root:
            return path
    pytest.fail(f"no config under configs/tasks/ trains {task_class} on demo {data_class} data")


def test_instance_segmentation_ddp_two_processes_gathers_coco_evaluation(tmp_path, demo_root):
    config = _config_for("InstanceSegmentationTask", "COCODataModule")
    out = _run_ddp(
        config,
        tmp_path,
        f"--data.data_root={demo_root / 'coco'}",
        "--data.batch_size=1",
        "--data.val_batch_size=1",
    )
    _assert_both_ranks_finished(out)
    metrics = _metrics(tmp_path)
    # The 2 x 2 validation batches of both ranks (the 4 demo val images) were scored once, on rank 0.
    assert len(metrics["val/segm_AP50"]) == 1, metrics
    for name in ("val/segm_AP50", "val/bbox_AP50", "val/segm_AP", "val/bbox_AP"):  # real numbers, never "nan"
        assert 0.0 <= float(metrics[name][0]) <= 1.0, (name, metrics[name])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_classification_ddp_two_processes(tmp_path, demo_root):
    config = REPO / "configs" / "tasks" / "shapes_classification_resnet18.yaml"
    out = _run_ddp(
        config,
        tmp_path,
        "--model.backbone=test_resnet",
        f"--data.data_root={demo_root / 'classification'}",
        "--data.image_size=32",
        "--data.batch_size=2",
    )
    _assert_both_ranks_finished(out)
    metrics = _metrics(tmp_path)
    assert len(metrics["val/top1"]) == 1  # one value for both ranks (the evaluator reduces over processes)
    assert 0.0 <= float(metrics["val/top1"][0]) <= 1.0
    assert len(metrics["train/loss"]) == 2  # one logged value per optimiser step (rank 0 logs)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _run_eval(command: str, config: Path, root: Path, devices: int, *overrides: str) -> subprocess.CompletedProcess:
    """``tools/eval.py <command>`` on ``devices`` CPU processes (gloo DDP when more than one), one thread each."""
    strategy = "ddp" if devices > 1 else "auto"
    base = [sys.executable, str(REPO / "tools" / "eval.py"), command, f"--config={config}", "--trainer.accelerator=cpu"]
    base += [f"--trainer.devices={devices}", f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={root}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    command_line = [*base, "--trainer.enable_progress_bar=false", "--data.num_workers=0", *overrides]
    return subprocess.run(command_line, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root, env=env)


def test_zip_ddp_two_processes_equal_one_process(tmp_path, demo_root, tiny_zip_checkpoints):
    from tests.models.foundation.tiny_models import zip_task_overrides

    config = REPO / "configs" / "zip" / "zip_coco_val2017.yaml"
    data = [f"--data.data_root={demo_root / 'coco'}", "--data.batch_size=1", *zip_task_overrides(tiny_zip_checkpoints)]
    stats, records = {}, {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        root.mkdir()
        out = _run_eval("validate", config, root, devices, *data)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        if devices == 2:
            _assert_both_ranks_finished(out)
        stats[devices] = {key: values for key, values in _metrics(root).items() if key.startswith("val/")}
        results = root / "predictions.json"
        out = _run_eval("predict", config, root, devices, *data, f"--model.predictions_path={results}")
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        records[devices] = sorted(json.loads(results.read_text()), key=lambda r: (r["image_id"], -r["score"]))
    # each of the 48 summary stats (class-aware and agnostic) logged once, equal for one and two processes
    assert len([key for key in stats[1] if "_AP/" not in key]) == 48 and stats[1] == stats[2], (stats[1], stats[2])
    assert all(len(values) == 1 and values[0] != "nan" for key, values in stats[2].items() if "_AP/" not in key)
    # the two ranks' shards, gathered once, give the records of the single process (all four images, none twice)
    assert records[2] == records[1] and {r["image_id"] for r in records[2]} == {1000001, 1000002, 1000003, 1000004}


def test_openus_pretraining_ddp_all_reduces_the_centres(tmp_path, demo_paths, monkeypatch):
    """One OpenUS step on two ranks: different images per rank, yet the CLS / patch centres (all-reduced) and the
    student weights (DDP) agree, while each rank keeps its own reconstruction importance (local, as released)."""
    config = REPO / "configs" / "openus" / "pretrain_synthetic.yaml"
    # the ranks import the test's callback from the repository
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = _run_ddp(
        config,
        tmp_path,
        f"--data.data_root={demo_paths['pretraining']['root']}",
        "--data.generate_demo=false",
        "--data.global_size=64",
        "--data.local_size=32",
        "--data.num_local=2",
        "--data.batch_size=2",
        "--trainer.limit_train_batches=1",
        "--trainer.callbacks+=tests.methods.openus.rank_state.SaveRankState",
    )
    _assert_both_ranks_finished(out)
    ranks = [torch.load(tmp_path / f"rank_state_{r}.pt", weights_only=True) for r in (0, 1)]
    torch.testing.assert_close(ranks[0]["center"], ranks[1]["center"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["center2"], ranks[1]["center2"], rtol=0, atol=0)
    assert ranks[0]["center"].abs().sum() > 0  # updated from zero
    for name, value in ranks[0]["student"].items():
        torch.testing.assert_close(ranks[1]["student"][name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(ranks[0]["importance"], ranks[1]["importance"])  # each rank saw its own images
