"""Benchmark: the pieces of an OpenUS pretraining step, one ``--part`` each.

Part ``attention``: peak memory and time of :func:`visionkit.ops.mamba_attention_map` at the shape of OpenUS's
teacher attention, VMamba-S stage 4 for the 64 global crops of 32 images: delta (64, 4·1536, 49), A (6144, 1),
B / C (64, 4, 1, 49), delta_bias (6144,), mode ``CwBw``, normalised (docs/ops/mamba_attention.md; shapes from
docs/models/vmamba.md, "Per-stage shapes"). Inputs are random (seed 0) with VMamba-like magnitudes: A = -1 (A_logs =
0), delta_bias = softplus⁻¹(dt) for dt log-uniform in [1e-3, 0.1], raw delta ~ N(0, 0.5²), B / C ~ N(0, 1). Variants:

  * ``default``: ``channel_chunk=None`` (the chunk the function picks; printed);
  * ``chunk128``: 128 channels of a direction at a time;
  * ``unchunked``: ``channel_chunk`` = all 1536 channels of a direction;
  * ``release`` (only with ``--release-style``): the per-channel maps materialised at once as in the release's
    ``AttnMamba.attnmap_mamba`` (a (64·4·1536, 49, 49) fp32 tensor, 3.8 GB), for scale.

Each variant is measured in two fresh Python processes, both after one untimed warm-up call. Memory, CPU: the kernel's
high-water mark is reset (``/proc/self/clear_refs``) and ``peak MB`` = ``VmHWM`` - ``VmRSS`` over one call; that
process pins glibc's mmap threshold at 64 KiB from its start so that freed tensors go back to the OS (Linux only).
Memory, CUDA: ``peak MB`` = ``torch.cuda.max_memory_allocated`` - the memory allocated before the call. Time: median of
``--repeats`` calls, with malloc's defaults (the pinned threshold makes every large allocation fault its pages in
afresh, which would dominate the timings).

Part ``step``: seconds per OpenUS pretraining step for each selective-scan backend of the VMamba (the backbone kwarg
``scan_backend``). A step is what ``lightning.pytorch.Trainer.fit`` runs per batch: ``on_train_batch_start`` (weight
decay schedule), ``training_step`` (teacher forward with the SS2D scan inputs recorded, :func:`mamba_attention_map`,
adaptive and block masks, student forward on the global and the local crops, DINO + iBOT + pixel losses), backward,
per-parameter clipping, AdamW step, lr schedule, then ``on_train_batch_end`` (EMA teacher update). ``training_step``
cannot run without a trainer (``_epochs()`` reads ``trainer.max_epochs`` and the hooks read
``trainer.estimated_stepping_batches``), so each configuration is one ``Trainer(max_epochs=1, limit_train_batches=1 +
repeats, logger=False, no checkpointing / progress bar / summary)`` fit over the same pre-built batch (already on the
device), and a subclass of ``OpenUSPretrain`` times the window from the start of its ``on_train_batch_start`` to the
end of its ``on_train_batch_end`` (synchronised on CUDA): Trainer set-up, data loading and the host-to-device copy are
outside it. The first step is an untimed warm-up (numba's compile / cache load, Triton's compile, lazy AdamW state);
``sec/step`` is the median of the timed steps. Every configuration starts from ``torch.manual_seed(0)``, so the models,
the data and the masks are the same for all backends of a (backbone, size) and the first step's loss must agree
(``loss 1``, a check of the backends, not of training). It is epoch 0 of a 1-epoch run: the lr is in its warm-up and
the heads' last layers get no update (``freeze_last_layer_epochs=1``), as in the first epoch of a real run.

  * CPU table (``--device cpu``): ``--backbones`` x global crop ``--sizes`` x ``--backends`` (default numba, torch,
    reference). ``--images`` images per batch (default 2), each with 2 global crops (what ``OpenUSPretrain``'s loss
    is built for) and ``--local-crops`` local crops (default 2); the local side is half the global one rounded down
    to a multiple of 32, at least 32 (96 -> 32, 224 -> 96: OpenUS's 224 / 96). Heads reduced for the CPU (out_dim =
    patch_out_dim = 1024, hidden 512, bottleneck 128; OpenUS: 8192 / 8192 / 2048 / 256); backbones with their
    registered drop-path rates (vmamba_test 0, vmamba_tiny 0.2). ``x ref`` / ``x torch`` = that backend's sec/step
    over this one's (> 1: faster than reference / torch). The sequential reference scan is slow at 224 for the larger
    backbones (~0.5-1 min per step on 2 cores, estimated from a forward pass): it is skipped there (the table says
    why) unless ``--include-slow``, and it gets ``--reference-repeats`` timed steps (default 1).
  * GPU section (``--device cuda``): vmamba_small (drop_path_rate 0.3, OpenUS's heads) with ``--gpu-backends``
    (default triton, torch), ``--gpu-images`` images (default 32, OpenUS's per-GPU batch) x (2 global crops of 224 + 8
    local crops of 96) as in ``configs/openus/pretrain_vmamba_small.yaml``, fp32 (``--gpu-precision``, the release's
    ``32-true``); also images / s and the peak of ``torch.cuda.max_memory_allocated``. Without CUDA it prints
    "skipped: no CUDA".

Usage::

    .venv/bin/python bench/openus_step.py --part attention --threads 2 --repeats 3
    .venv/bin/python bench/openus_step.py --part all --release-style

Full runs of part ``step`` (CPU, quiet 2-core machine; then a GPU machine)::

    .venv/bin/python bench/openus_step.py --part step --device cpu --threads 2 --repeats 3 --include-slow
    .venv/bin/python bench/openus_step.py --part step --device cuda --repeats 5

Smallest dry run::

    .venv/bin/python bench/openus_step.py --part step --device cpu --backbones vmamba_test --sizes 96 --repeats 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from visionkit.ops import mamba_attention_map

# VMamba-S stage 4 (d_inner 1536, d_state 1, 7 x 7 tokens) for 2 global crops x 32 images per GPU.
ATTENTION_SHAPE = dict(batch=64, d_inner=1536, n_state=1, height=7, width=7)
ATTENTION_VARIANTS = {"default": None, "chunk128": 128, "unchunked": -1, "release": -2}


def attention_inputs(
    batch: int, d_inner: int, n_state: int, height: int, width: int, device: str
) -> dict[str, torch.Tensor]:
    """Random scan inputs of one SS2D (fp32, seed 0) with VMamba-like magnitudes."""
    g = torch.Generator().manual_seed(0)
    channels, length = 4 * d_inner, height * width
    dt = torch.exp(torch.rand(channels, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = {
        "delta": 0.5 * torch.randn(batch, channels, length, generator=g),
        "A": -torch.ones(channels, n_state),
        "B": torch.randn(batch, 4, n_state, length, generator=g),
        "C": torch.randn(batch, 4, n_state, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def release_style_attention(x: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """The release's memory pattern: every channel's (L, L) map at once, then the mean (CwBw, 4 directions summed)."""
    batch, groups, n_state, length = x["B"].shape
    d_inner = x["A"].shape[0] // groups
    dt = F.softplus(x["delta"] + x["delta_bias"][:, None]).view(batch, groups, d_inner, 1, length)
    w = torch.cumsum(x["A"].view(1, groups, d_inner, n_state, 1) * dt, dim=-1).exp()  # (B, K, D, N, L)
    q = (x["C"][:, :, None] * w).reshape(-1, n_state, length)
    k = (x["B"][:, :, None] / w.clamp(min=1e-20)).reshape(-1, n_state, length)
    maps = (q.transpose(1, 2) @ k).view(batch, groups, d_inner, length, length).mean(2).tril()
    order = torch.arange(length, device=maps.device).view(height, width)
    seqs = [order.flatten(), order.t().flatten(), order.flatten().flip(0), order.t().flatten().flip(0)]
    total = sum(maps[:, i][:, torch.argsort(s)][:, :, torch.argsort(s)] for i, s in enumerate(seqs))
    return (total - total.min()) / (total.max() - total.min())


def _attention_runner(variant: str, x: dict[str, torch.Tensor], d_inner: int, height: int, width: int) -> Callable:
    chunk = ATTENTION_VARIANTS[variant]
    if chunk == -2:
        return lambda: release_style_attention(x, height, width)
    chunk = d_inner if chunk == -1 else chunk
    return lambda: mamba_attention_map(
        x["delta"], x["A"], x["B"], x["C"], height=height, width=width, delta_bias=x["delta_bias"], channel_chunk=chunk
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _pin_malloc() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks via mmap, returned to the OS when freed
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _measure_attention_variant(
    variant: str, what: str, device: str, repeats: int, threads: int | None
) -> dict[str, float]:
    """One variant in this (fresh) process: ``what`` = ``"memory"`` (peak of one call) or ``"time"`` (median)."""
    if device == "cpu" and what == "memory":
        _pin_malloc()  # timing runs with malloc's defaults: pinned, every large allocation page-faults afresh
    if threads:
        torch.set_num_threads(threads)
    shape = ATTENTION_SHAPE
    x = attention_inputs(**shape, device=device)
    run = _attention_runner(variant, x, shape["d_inner"], shape["height"], shape["width"])
    with torch.no_grad():
        out = run()  # warm-up
        del out
        if what == "time":
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return {"time s": statistics.median(times)}
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            return {"peak MB": (torch.cuda.max_memory_allocated() - base) / 2**20}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        base = _status_kib("VmRSS")
        run()
        return {"peak MB": (_status_kib("VmHWM") - base) / 1024}


def attention_memory(
    variants: list[str], device: str = "cpu", repeats: int = 3, threads: int | None = None
) -> list[dict[str, object]]:
    """Measure each variant in its own Python process; returns one row per variant (variant, chunk, peak MB, time s)."""
    from visionkit.ops.mamba_attention import _resolve_chunk

    shape = ATTENTION_SHAPE
    default_chunk = _resolve_chunk(None, shape["d_inner"], shape["batch"], shape["n_state"], 49, torch.float32)
    chunks = {"default": default_chunk, "chunk128": 128, "unchunked": shape["d_inner"], "release": "all at once"}
    rows = []
    for variant in variants:
        row: dict[str, object] = {"variant": variant, "chunk": chunks[variant]}
        for what in ("memory", "time"):
            cmd = [sys.executable, __file__, "--_measure", variant, what, "--device", device, "--repeats", str(repeats)]
            if threads:
                cmd += ["--threads", str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        rows.append(row)
    return rows


def run_attention(args: argparse.Namespace) -> None:
    """Part ``attention``: print the table and the ratios to the unchunked call."""
    variants = ["default", "chunk128", "unchunked"] + (["release"] if args.release_style else [])
    rows = attention_memory(variants, args.device, args.repeats, args.threads)
    s = ATTENTION_SHAPE
    threads = args.threads or torch.get_num_threads()
    print(
        f"mamba_attention_map, mode CwBw, device {args.device}, threads {threads}: "
        f"delta ({s['batch']}, {4 * s['d_inner']}, {s['height'] * s['width']}), N = {s['n_state']}"
    )
    base = next(r for r in rows if r["variant"] == "unchunked")
    print(f"{'variant':<10} {'chunk':>12} {'peak MB':>9} {'time s':>8} {'peak / unchunked':>17}")
    for r in rows:
        ratio = r["peak MB"] / base["peak MB"] if base["peak MB"] > 0 else float("nan")
        print(f"{r['variant']:<10} {r['chunk']!s:>12} {r['peak MB']:>9.1f} {r['time s']:>8.3f} {ratio:>17.2f}")


# ---------------------------------------------------------------------------------------------------- part "step"

#: Heads of the CPU table (OpenUS's 8192 / 8192 / 2048 / 256 would dominate a CPU step of the small backbones).
CPU_HEAD = dict(out_dim=1024, patch_out_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128)
#: The GPU section: OpenUS's VMamba-S run (configs/openus/pretrain_vmamba_small.yaml) on one GPU.
GPU_BACKBONE, GPU_BACKBONE_KWARGS = "vmamba_small", {"drop_path_rate": 0.3}
GPU_GLOBAL, GPU_LOCAL, GPU_NUM_LOCAL = 224, 96, 8
#: Global crops per image: ``OpenUSPretrain``'s loss is built for 2 (the teacher's views).
NUM_GLOBAL = 2


def local_size(global_size: int) -> int:
    """Side of the local crops: half the global side, rounded down to a multiple of 32, at least 32."""
    return max(32, global_size // 2 // 32 * 32)


def slow_reason(backbone: str, size: int, backend: str) -> str | None:
    """Why a configuration is left out without ``--include-slow`` (the sequential scan on a 224 crop); else None."""
    if backend == "reference" and backbone != "vmamba_test" and size >= 224:
        return f"sequential reference scan of {backbone} at {size}, ~0.5-1 min per step on 2 cores (--include-slow)"
    return None


def _timed_task_class() -> type:
    """``OpenUSPretrain`` timing its step: start of ``on_train_batch_start`` to end of ``on_train_batch_end``."""
    from visionkit.methods.openus import OpenUSPretrain

    class TimedOpenUS(OpenUSPretrain):
        def _sync(self) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self._sync()
            self._step_start = time.perf_counter()
            super().on_train_batch_start(batch, batch_idx)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end(outputs, batch, batch_idx)
            self._sync()
            self.step_times.append(time.perf_counter() - self._step_start)
            self.step_losses.append(float(outputs["loss"]))

    return TimedOpenUS


class _SameBatch:
    """An iterable of ``count`` times the same batch (a list would be read as several dataloaders by Lightning)."""

    def __init__(self, batch: Any, count: int) -> None:
        self.batch, self.count = batch, count

    def __iter__(self) -> Any:
        return iter([self.batch] * self.count)

    def __len__(self) -> int:
        return self.count


def time_steps(
    backbone: str,
    backbone_kwargs: dict[str, Any],
    head: dict[str, int],
    images: int,
    crops: list[int],
    device: str,
    steps: int,
    precision: str = "32-true",
) -> dict[str, float]:
    """Fit ``1 + steps`` OpenUS steps on one random batch; the median time of the last ``steps`` and the first loss.

    Args:
        backbone: Registered VMamba name.
        backbone_kwargs: Backbone arguments (``scan_backend`` among them).
        head: iBOT head dimensions (``OpenUSPretrain`` arguments).
        images: Images per batch.
        crops: Side of each crop of an image, the global ones first (all global crops have the same side).
        device: ``"cpu"`` or ``"cuda"``.
        steps: Timed steps after the untimed warm-up step.
        precision: Lightning ``precision``.

    Returns:
        ``sec`` (median seconds per timed step), ``loss`` (of the first, warm-up step), ``peak GB`` (CUDA peak or
        nan) and ``steps`` (timed steps).
    """
    import lightning.pytorch as pl

    _quiet_lightning()  # after the import, which sets its loggers' levels
    torch.manual_seed(0)
    task = _timed_task_class()(backbone=backbone, backbone_kwargs=backbone_kwargs, **head)
    task.step_times, task.step_losses = [], []
    batch = ([torch.randn(images, 3, side, side, device=device) for side in crops], {})
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1 + steps,
        accelerator=device,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    gc.collect()  # the previous configuration's trainer and task
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=_SameBatch(batch, 1 + steps))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    times = task.step_times[1:]
    return {"sec": statistics.median(times), "loss": task.step_losses[0], "peak GB": peak, "steps": len(times)}


def _quiet_lightning() -> None:
    """Silence Lightning's per-fit info lines and the warnings a benchmark fit triggers (no workers, no logger...)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|num_workers|log_every_n_steps).*")


def _ratio(num: float | None, den: float) -> str:
    return f"{num / den:.2f}x" if num is not None else "-"


def _step_cpu(args: argparse.Namespace) -> None:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    backends = args.backends.split(",")
    if "numba" in backends:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    backbones, sizes = args.backbones.split(","), [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        if size % 32:
            raise SystemExit(f"--sizes: VMamba needs multiples of 32, got {size}")
    crops_desc = f"{NUM_GLOBAL} global + {args.local_crops} local crops"
    print(
        f"OpenUS pretraining step, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch / numba threads; torch {torch.__version__}, fp32, seed 0; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"batch: {args.images} images x ({crops_desc}); local side = max(32, global // 2 rounded down to 32): "
        + ", ".join(f"{s} -> {local_size(s)}" for s in sizes)
    )
    print(
        "heads reduced for the CPU: out_dim {out_dim}, patch_out_dim {patch_out_dim}, hidden {head_hidden_dim}, "
        "bottleneck {head_bottleneck_dim} (OpenUS: 8192 / 8192 / 2048 / 256)".format(**CPU_HEAD)
    )
    print(
        f"sec/step: median of {args.repeats} steps (reference: {args.reference_repeats}) after 1 warm-up step; "
        "window: on_train_batch_start .. on_train_batch_end (fwd, bwd, clip, AdamW, EMA)"
    )
    rows: list[tuple[str, int, str, dict[str, float] | str]] = []
    for backbone in backbones:
        for size in sizes:
            crops = [size] * NUM_GLOBAL + [local_size(size)] * args.local_crops
            for backend in backends:
                reason = slow_reason(backbone, size, backend)
                if reason is not None and not args.include_slow:
                    rows.append((backbone, size, backend, f"skipped: {reason}"))
                    print(f"  {backbone} {size} {backend}: skipped", flush=True)
                    continue
                steps = args.reference_repeats if backend == "reference" else args.repeats
                kwargs = {"scan_backend": backend}
                start = time.perf_counter()
                result = time_steps(backbone, kwargs, CPU_HEAD, args.images, crops, "cpu", steps)
                rows.append((backbone, size, backend, result))
                print(f"  {backbone} {size} {backend}: done in {time.perf_counter() - start:.1f} s", flush=True)
    print()
    print(
        f"{'backbone':<12} {'size':>8} {'backend':<10} {'steps':>5} {'sec/step':>9} {'x ref':>7} {'x torch':>8}  loss 1"
    )
    for backbone, size, backend, result in rows:
        label = f"{size}/{local_size(size)}"
        if isinstance(result, str):
            print(f"{backbone:<12} {label:>8} {backend:<10} {'':>5} {'-':>9} {'-':>7} {'-':>8}  {result}")
            continue
        same = {r[2]: r[3] for r in rows if r[0] == backbone and r[1] == size and not isinstance(r[3], str)}
        ref, tor = same.get("reference", {}).get("sec"), same.get("torch", {}).get("sec")
        print(
            f"{backbone:<12} {label:>8} {backend:<10} {result['steps']:>5} {result['sec']:>9.3f} "
            f"{_ratio(ref, result['sec']):>7} {_ratio(tor, result['sec']):>8}  {result['loss']:.6f}"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def _step_gpu(args: argparse.Namespace) -> None:
    title = f"OpenUS pretraining step, GPU, {GPU_BACKBONE} ({', '.join(args.gpu_backends.split(','))})"
    if not torch.cuda.is_available():
        print(f"{title}: skipped: no CUDA")
        return
    if args.device != "cuda":
        print(f"{title}: skipped: --device {args.device} (run with --device cuda)")
        return
    props = torch.cuda.get_device_properties(0)
    crops = [GPU_GLOBAL] * NUM_GLOBAL + [GPU_LOCAL] * GPU_NUM_LOCAL
    print(f"{title}: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    print(
        f"batch: {args.gpu_images} images x ({NUM_GLOBAL} global crops of {GPU_GLOBAL} + {GPU_NUM_LOCAL} local "
        f"of {GPU_LOCAL}); OpenUS heads (8192 / 8192 / 2048 / 256); {GPU_BACKBONE_KWARGS}; precision "
        f"{args.gpu_precision}; median of {args.repeats} steps after 1 warm-up step"
    )
    rows = []
    for backend in args.gpu_backends.split(","):
        kwargs = {**GPU_BACKBONE_KWARGS, "scan_backend": backend}
        start = time.perf_counter()
        result = time_steps(GPU_BACKBONE, kwargs, {}, args.gpu_images, crops, "cuda", args.repeats, args.gpu_precision)
        rows.append((backend, result))
        print(f"  {backend}: done in {time.perf_counter() - start:.1f} s", flush=True)
    tor = dict(rows).get("torch", {}).get("sec")
    print(f"\n{'backend':<10} {'sec/step':>9} {'images/s':>9} {'x torch':>8} {'peak GB':>8}  loss 1")
    for backend, r in rows:
        print(
            f"{backend:<10} {r['sec']:>9.4f} {args.gpu_images / r['sec']:>9.1f} {_ratio(tor, r['sec']):>8} "
            f"{r['peak GB']:>8.2f}  {r['loss']:.6f}"
        )


def run_step(args: argparse.Namespace) -> None:
    """Part ``step``: seconds per pretraining step by scan backend (CPU table or GPU section, by ``--device``)."""
    if args.device == "cpu":
        _step_cpu(args)
        print()
    _step_gpu(args)


#: Benchmark parts, run in this order by ``--part all``.
PARTS: dict[str, Callable[[argparse.Namespace], None]] = {"attention": run_attention, "step": run_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all", help="which benchmark to run")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls / steps (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--release-style", action="store_true", help="also run the release's all-at-once pattern")
    step = parser.add_argument_group("part step")
    step.add_argument("--backbones", default="vmamba_test,vmamba_tiny", help="CPU table: comma-separated VMamba names")
    step.add_argument("--sizes", default="96,224", help="CPU table: comma-separated global crop sides (x 32)")
    step.add_argument("--backends", default="numba,torch,reference", help="CPU table: comma-separated scan backends")
    step.add_argument("--images", type=int, default=2, help="CPU table: images per batch")
    step.add_argument("--local-crops", type=int, default=2, help="CPU table: local crops per image")
    step.add_argument("--reference-repeats", type=int, default=1, help="CPU table: timed steps of the reference")
    step.add_argument("--include-slow", action="store_true", help="CPU table: run the reference at 224 on big models")
    step.add_argument("--gpu-backends", default="triton,torch", help="GPU section: comma-separated scan backends")
    step.add_argument("--gpu-images", type=int, default=32, help="GPU section: images per batch")
    step.add_argument("--gpu-precision", default="32-true", help="GPU section: Lightning precision")
    parser.add_argument("--_measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure is not None:
        variant, what = args._measure
        print(json.dumps(_measure_attention_variant(variant, what, args.device, args.repeats, args.threads)))
        return
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            part(args)


if __name__ == "__main__":
    main()
