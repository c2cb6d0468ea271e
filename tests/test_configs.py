"""Every YAML under configs/ runs through the CLI (fast_dev_run, CPU) on the demo data."""

from pathlib import Path

import pytest
import yaml

from visionkit.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DEMO_PREFIX = "data/demo/"


def _demo_overrides(config: dict, demo_root: Path) -> list[str]:
    """Point every ``data.init_args`` path below ``data/demo/`` at the test session's demo data."""
    init_args = (config.get("data") or {}).get("init_args") or {}
    return [
        f"--data.{key}={demo_root / value[len(DEMO_PREFIX) :]}"
        for key, value in init_args.items()
        if isinstance(value, str) and value.startswith(DEMO_PREFIX)
    ]


@pytest.mark.parametrize("config_path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_runs_with_fast_dev_run(config_path, demo_root, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    args = [
        "fit",
        f"--config={config_path}",
        *_demo_overrides(config, demo_root),
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
