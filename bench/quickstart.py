"""Benchmark: the README's quickstart command, end to end, repeated in fresh processes.

Runs ``python tools/train.py fit --config configs/quickstart.yaml`` ``--runs`` times, each in a new subprocess and
from a clean output folder (the config's ``trainer.default_root_dir``, removed before every run); with
``--clean-data`` the demo set (the config's ``data.init_args.data_root``) is removed too, so that every run also
writes it, as a newcomer's first run does. Per run it prints the wall time, the CPU time (user + sys of the
subprocess), the CPU time that other processes took meanwhile (from ``/proc/stat``; about 0 on a quiet machine), the
1-minute load average before the run, and the final ``val/segm_AP50`` and ``val/bbox_AP50`` read from the run's
``<root>/logs/version_N/metrics.csv``; then min / median / max of the wall time against the README's target. It also
checks that the documented outputs exist (``metrics.csv``, ``config.yaml``, ``val_predictions_epoch*.png``,
``checkpoints/last.ckpt``). Each run's output goes to ``outputs/bench_quickstart/run_<i>.log``.

A busy machine inflates the time far more than its share of the CPU: torch runs one thread per core, and on 2 cores
every parallel region then waits for the thread that another process has displaced. Time the README number only
when the "others" column stays near 0.

Usage::

    .venv/bin/python bench/quickstart.py                     # 3 runs, demo data kept after the first
    .venv/bin/python bench/quickstart.py --runs 2 --clean-data
    .venv/bin/python bench/quickstart.py --runs 1 --threads 1 -- --trainer.max_epochs 1  # extra train.py arguments
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 180.0  # the README's promise: under 3 minutes on a quiet 2-core machine
WIDTHS = (3, 7, 7, 12, 5, 9, 9, 5)


def _config_paths(config: Path) -> tuple[Path, Path | None]:
    """The output root and the demo data root that ``config`` uses (relative paths are taken from the repo root)."""
    content = yaml.safe_load(config.read_text()) or {}
    root = Path((content.get("trainer") or {}).get("default_root_dir") or "outputs")
    data_args = (content.get("data") or {}).get("init_args") or {}
    data_root = Path(data_args["data_root"]) if data_args.get("generate_demo") and data_args.get("data_root") else None
    return (REPO / root, REPO / data_root if data_root is not None else None)


def _last_value(rows: list[dict[str, str]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) not in (None, "")]
    return float(values[-1]) if values else None


def _read_run(root: Path) -> dict[str, object]:
    """Final AP50s from the newest ``logs/version_N/metrics.csv`` under ``root``, and which documented files exist."""
    versions = sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    result: dict[str, object] = {"segm_AP50": None, "bbox_AP50": None, "epoch": None, "missing": []}
    if not versions:
        result["missing"] = ["logs/version_N/"]
        return result
    log_dir = versions[-1]
    missing = [name for name in ("metrics.csv", "config.yaml") if not (log_dir / name).is_file()]
    if not list(log_dir.glob("val_predictions_epoch*.png")):
        missing.append("val_predictions_epoch*.png")
    if not (root / "checkpoints" / "last.ckpt").is_file():
        missing.append("checkpoints/last.ckpt")
    result["missing"] = missing
    if (log_dir / "metrics.csv").is_file():
        with open(log_dir / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        result["segm_AP50"] = _last_value(rows, "val/segm_AP50")
        result["bbox_AP50"] = _last_value(rows, "val/bbox_AP50")
        val_rows = [row for row in rows if row.get("val/segm_AP50")]
        result["epoch"] = int(val_rows[-1]["epoch"]) if val_rows and val_rows[-1].get("epoch") else None
    return result


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``), or None where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(cells: tuple[str, ...]) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS, strict=True))


def _fmt(value: object, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="number of runs (default 3)")
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"), help="the quickstart YAML")
    parser.add_argument(
        "--clean-data", action="store_true", help="remove the demo data before every run (times its generation too)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OMP_NUM_THREADS for the runs (default: unset, as in the README: torch uses one thread per core)",
    )
    parser.add_argument("extra", nargs="*", help="extra arguments for tools/train.py (after --)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    config = args.config if args.config.is_absolute() else REPO / args.config
    output_root, data_root = _config_paths(config)
    if args.clean_data and data_root is None:
        parser.error(f"--clean-data: {config} does not generate its data (data.init_args.generate_demo)")
    log_dir = REPO / "outputs" / "bench_quickstart"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "tools/train.py", "fit", "--config", str(config.relative_to(REPO)), *args.extra]

    import torch  # only for the machine description; the runs import it themselves

    print(f"command: {' '.join(command[1:])}  (cwd {REPO})")
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({args.threads or torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    print(
        f"each run starts from a clean {output_root.relative_to(REPO)}/"
        + (f" and a clean {data_root.relative_to(REPO)}/ (demo generation timed)" if args.clean_data else "")
    )
    header = ("run", "wall s", "cpu s", "others cpu s", "load1", "segm AP50", "bbox AP50", "epoch")
    print(_row(header) + "  notes")
    walls: list[float] = []
    for index in range(1, args.runs + 1):
        shutil.rmtree(output_root, ignore_errors=True)
        if args.clean_data and data_root is not None:
            shutil.rmtree(data_root, ignore_errors=True)
        load = os.getloadavg()[0]
        busy_before = _busy_cpu_seconds()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        log_file = log_dir / f"run_{index}.log"
        start = time.perf_counter()
        with open(log_file, "w") as log:
            code = subprocess.run(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_after = _busy_cpu_seconds()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        # CPU time that other processes took during the run: a quiet machine shows ~0
        others = None if busy_before is None or busy_after is None else max(busy_after - busy_before - cpu, 0.0)
        run = _read_run(output_root)
        notes = [f"exit code {code}, see {log_file.relative_to(REPO)}"] if code else []
        if run["missing"]:
            notes.append("missing: " + ", ".join(run["missing"]))  # type: ignore[arg-type]
        cells = (
            str(index),
            f"{wall:.1f}",
            f"{cpu:.1f}",
            _fmt(others, ".1f"),
            f"{load:.2f}",
            _fmt(run["segm_AP50"]),
            _fmt(run["bbox_AP50"]),
            _fmt(run["epoch"], "d"),
        )
        print(_row(cells) + "  " + "; ".join(notes), flush=True)
        if code == 0:
            walls.append(wall)
    if not walls:
        sys.exit("every run failed")
    low, mid, high = min(walls), statistics.median(walls), max(walls)
    verdict = "met" if high < TARGET_S else "NOT met"
    print(f"wall time over {len(walls)} run(s): min {low:.1f} s, median {mid:.1f} s, max {high:.1f} s")
    print(f"target < {TARGET_S:.0f} s (README): {verdict} (max / target = {high / TARGET_S:.2f})")


if __name__ == "__main__":
    main()
