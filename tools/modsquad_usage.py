"""Expert usage of trained multi-task Mod-Squad runs, side by side: per layer and task, how specialised routing is.

    python tools/modsquad_usage.py outputs/modsquad/multitask_demo/checkpoints/last.ckpt \
        outputs/modsquad/multitask_demo_no_mi/checkpoints/last.ckpt --out outputs/modsquad/usage.png

For every checkpoint (a ``MultiTaskTask`` run) and every MoE layer, from the layers' usage EMA (the statistics that
extraction reads): each task's usage entropy in nats (``log E`` = every expert equally, lower = fewer experts) and the
mean Jaccard overlap of the tasks' top-k expert sets over task pairs (1 = all tasks use the same experts, 0 = disjoint).
The PNG stacks one heat map per layer (rows = tasks, columns = experts) for each checkpoint, in the order given.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from visionkit.methods.modsquad import (
    find_routing_stats,
    load_multitask_checkpoint,
    topk_overlap,
    usage_entropy,
    usage_heatmap,
)
from visionkit.viz import image_grid, save_png, with_caption


def layer_usage(path: Path) -> tuple[list[str], dict[str, dict[str, object]]]:
    """Task names and, per MoE layer, usage (%), entropies and mean top-k overlap of one run's checkpoint."""
    try:
        module = load_multitask_checkpoint(path)
    except ValueError as error:
        sys.exit(f"error: {error}")
    layers: dict[str, dict[str, object]] = {}
    for name, stats in find_routing_stats(module.backbone).items():
        usage = stats.usage_percent()
        overlap = topk_overlap(usage, stats.k)
        pairs = ~torch.eye(usage.shape[0], dtype=torch.bool)
        layers[name] = {
            "usage": usage,
            "entropy": usage_entropy(usage),
            "overlap": float(overlap[pairs].mean()) if usage.shape[0] > 1 else 1.0,
            "k": stats.k,
        }
    return module.task_names, layers


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, object]]]:
    """Print the table, write the PNG; returns the numbers by checkpoint and layer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="MultiTaskTask checkpoints (.ckpt)")
    parser.add_argument("--out", type=Path, default=None, help="PNG of the usage heat maps")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per checkpoint (default: file paths)")
    ns = parser.parse_args(argv)
    labels = ns.labels or [str(path) for path in ns.checkpoints]
    if len(labels) != len(ns.checkpoints):
        sys.exit(f"error: {len(labels)} labels for {len(ns.checkpoints)} checkpoints")
    results, panels = {}, []
    for label, path in zip(labels, ns.checkpoints, strict=True):
        names, layers = layer_usage(path)
        results[label] = layers
        print(f"\n{label}  (entropy in nats per task; overlap = mean Jaccard of top-k expert sets over task pairs)")
        print(f"{'layer':<16}{'E':>4}{'k':>3}  " + "".join(f"{'H ' + n:>12}" for n in names) + f"{'overlap':>10}")
        for layer, row in layers.items():
            usage = row["usage"]
            entropy = " ".join(f"{h:>11.3f}" for h in row["entropy"].tolist())
            print(f"{layer:<16}{usage.shape[1]:>4}{row['k']:>3}   {entropy}{row['overlap']:>10.3f}")
            title = f"{label}: {layer} (max H {math.log(usage.shape[1]):.2f}, overlap {row['overlap']:.2f})\n" + (
                ", ".join(f"{n}: H={h:.2f}" for n, h in zip(names, row["entropy"].tolist(), strict=True))
            )
            panels.append(usage_heatmap(usage, title, cell=24))
    if ns.out is not None:
        columns = max(1, len(panels) // len(ns.checkpoints))
        grid = image_grid([panel.convert("RGB") for panel in panels], columns=columns, padding=8)
        caption = "rows: tasks, columns: experts, colour: share of the task's routed slots (row-scaled)"
        path = save_png(with_caption(grid, caption) if isinstance(grid, Image.Image) else grid, ns.out)
        print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
