"""Benchmark: step time and peak memory of the three multi-task sampling options of ``MultiTaskTask`` on the CPU.

The model and data are those of ``configs/modsquad/multitask_demo.yaml`` (modsquad_vit_test, Mask R-CNN at 128 px
on 4 COCO-demo images, UperNet on 4 ADE20K-demo crops of 96 px, a linear head on 16 classification images of 64 px).
A *step* is: the forward of the step's task sub-batches (each task's own ``training_step``, i.e. its loss), the MI
loss over the step's routing (``mutual_information_total``), backward, AdamW step. Data loading is outside the step
(each task's batch is built once, before timing).

Each measured configuration runs in a fresh Python process: ``all`` (every task in the step: option A) and one
process per task (the step of a single task). From those, per option:

  * A (``mixed``): the ``all`` step;
  * B (``per_rank``, one task per rank): the step of the slowest task; memory of the largest (a rank's peak);
  * C (``per_step``, one drawn task per step, uniform): the mean over tasks of the single-task step time; memory of
    the largest (every task is drawn sooner or later).

``sec/step`` is the median of ``--repeats`` steps after 2 warm-up steps; ``peak MB`` is the process's memory
high-water mark over the timed steps above its resident memory before them (``/proc/self/clear_refs`` then
``VmHWM`` − ``VmRSS``, Linux; glibc's mmap threshold pinned at 64 KiB so that freed tensors are returned to the OS).
``x A`` = the option's value over option A's. B also needs one process (a GPU) per task and C needs ~3x the steps for
the same number of samples per task: the table gives the per-step cost only.

    python bench/multitask_step.py [--repeats 5] [--data-root data/demo]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/modsquad/multitask_demo.yaml"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(tasks: list[str], repeats: int, data_root: str) -> dict[str, float]:
    """Time ``repeats`` steps over ``tasks`` in this process; returns sec/step and peak MB."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: return freed tensors to the OS
    import torch
    import yaml

    import visionkit.data
    from visionkit.methods.modsquad import MultiTaskTask, mutual_information_total

    torch.manual_seed(0)
    config = yaml.safe_load(CONFIG.read_text())
    module = MultiTaskTask(**config["model"]["init_args"]).train()
    batches = {}
    for name in tasks:
        spec = config["data"]["init_args"]["datamodules"][name]
        arguments = dict(spec["init_args"])
        arguments["data_root"] = str(Path(data_root) / Path(arguments["data_root"]).name)
        child = getattr(visionkit.data, spec["class_path"].rsplit(".", 1)[-1])(**arguments)
        child.prepare_data()
        child.setup("fit")
        batches[name] = next(iter(child.train_dataloader()))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        losses = {name: module.heads[name].training_step(batches[name], 0) for name in tasks}
        loss = module.combine_losses(losses) + mutual_information_total(module.routing_stats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tasks' self.log without a Trainer
        for _ in range(2):
            step()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = _status_kb("VmHWM") - before
    return {"sec": statistics.median(times), "peak_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", default="data/demo")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker is not None:
        print(json.dumps(measure(ns.worker.split(","), ns.repeats, ns.data_root)))
        return
    import torch

    tasks = ["coco", "ade20k", "cls"]
    results = {}
    for config in ["all", *tasks]:
        worker = ",".join(tasks) if config == "all" else config
        command = [sys.executable, __file__, "--worker", worker, "--repeats", str(ns.repeats)]
        command += ["--data-root", ns.data_root]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        results[config] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"  measured {config}: {results[config]}", flush=True)
    single = [results[name] for name in tasks]
    options = {
        "A mixed (all tasks / step)": results["all"],
        "B per_rank (slowest rank)": {
            "sec": max(r["sec"] for r in single),
            "peak_mb": max(r["peak_mb"] for r in single),
        },
        "C per_step (mean drawn task)": {
            "sec": statistics.mean(r["sec"] for r in single),
            "peak_mb": max(r["peak_mb"] for r in single),
        },
    }
    base = options["A mixed (all tasks / step)"]
    print(f"\nMultiTaskTask step, multitask_demo.yaml, CPU ({torch.get_num_threads()} threads), median of {ns.repeats}")
    print(f"{'option':<32}{'sec/step':>10}{'x A':>7}{'peak MB':>10}{'x A':>7}")
    for name, r in options.items():
        print(
            f"{name:<32}{r['sec']:>10.3f}{r['sec'] / base['sec']:>7.2f}"
            f"{r['peak_mb']:>10.1f}{r['peak_mb'] / base['peak_mb']:>7.2f}"
        )
    print("\nper task (one task per step):")
    for name in tasks:
        print(f"  {name:<8}{results[name]['sec']:>8.3f} s {results[name]['peak_mb']:>8.1f} MB")


if __name__ == "__main__":
    main()
