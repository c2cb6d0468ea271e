"""Benchmark: training throughput (forward + backward, images/s) of VMamba-T v2 against DeiT-S (CPU by default).

Both models are built from scratch (no weights) in one process and timed alternately on the same random batch at
224x224: ``vmamba_tiny`` (30M parameters, 4.9 GFLOPs) and timm's ``deit_small_patch16_224`` (22M, 4.6 GFLOPs), a
transformer of similar cost. Each timed iteration is a forward pass, a mean-squared loss on the logits and a backward
pass (no optimiser step). The VMamba selective scan runs with ``--scan-backend`` (default ``"auto"``: numba on the CPU
when it imports, else the chunked PyTorch scan); a comma-separated list times one VMamba per backend. ``--device
cuda`` runs the same comparison on a GPU (``bench/gpu_check.sh`` does, with the triton and torch scans).

Usage::

    .venv/bin/python bench/backbones.py --batch 8 --iters 5 --warmup 2 --scan-backend auto
    python bench/backbones.py --device cuda --batch 64 --iters 10 --scan-backend triton,torch
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import visionkit.models.backbones  # noqa: F401  (registers the VMamba sizes)
from visionkit import create_model
from visionkit.ops.selective_scan import resolve_selective_scan_backend


def _step(model: nn.Module, images: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(images).square().mean().backward()
    if images.is_cuda:
        torch.cuda.synchronize()


def _time_alternately(models: dict[str, nn.Module], images: torch.Tensor, warmup: int, iters: int) -> dict[str, list]:
    """Seconds per iteration of each model; the models take turns, so a slow spell of the machine hits both."""
    for model in models.values():
        for _ in range(warmup):
            _step(model, images)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(iters):
        for name, model in models.items():
            start = time.perf_counter()
            _step(model, images)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--scan-backend", default="auto", help="visionkit.ops.selective_scan backend of VMamba")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    models = {}
    for name in args.scan_backend.split(","):
        backend = resolve_selective_scan_backend(name, images.device)
        models[f"vmamba_tiny (scan: {backend})"] = create_model("vmamba_tiny", scan_backend=name)
    models["deit_small_patch16_224"] = create_model("deit_small_patch16_224", img_size=args.size)
    for model in models.values():
        model.to(args.device).train()
    where = torch.cuda.get_device_name() if images.is_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{where}, torch {torch.__version__}; batch {args.batch} at {args.size}px, "
        f"forward + backward, {args.warmup} warm-up + {args.iters} timed iterations per model, alternating; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for name, times in _time_alternately(models, images, args.warmup, args.iters).items():
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        results[name] = args.batch / statistics.median(times)
        print(
            f"{name:32s} {params:6.1f}M params  median {statistics.median(times):7.3f} s/iter  "
            f"best {min(times):7.3f} s  {results[name]:7.2f} img/s"
        )
    deit, deit_rate = list(results.items())[-1]
    for vmamba, vmamba_rate in list(results.items())[:-1]:
        print(f"ratio {vmamba} / {deit}: {vmamba_rate / deit_rate:.2f}x images/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
