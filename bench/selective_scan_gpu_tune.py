"""Tune the Triton selective-scan launch shapes on a GPU: where the time goes, and which tiles are fastest.

Two parts, both printed as short tables (the full sweep also goes to ``--log``):

1. Profile: for each shape, forward+backward of the ``"triton"`` and ``"torch"`` backends: wall time per call (CUDA
   events around the Python call, as ``bench/selective_scan_gpu.py`` times it) next to the GPU time of the kernels
   (``torch.profiler``), so that host overhead and kernel time can be told apart; the slowest kernels are listed.
2. Sweep: every launch shape (chunk length BLOCK_L; channels per program BLOCK_D and warps, chosen separately for the
   forward and the backward kernel) of the training path, each kernel timed alone with CUDA-graph replays
   (``triton.testing.do_bench_cudagraph``: GPU time without launch gaps). Variants are compiled first by a pool of
   worker processes that fill Triton's on-disk cache. The best shape per chunk length is then timed end to end
   against the current default choice.

Usage::

    python bench/selective_scan_gpu_tune.py [--shapes stage1,stage3] [--workers 12] [--log sweep.txt]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selective_scan_gpu import SHAPES, make_inputs, run, time_ms

from visionkit.ops.selective_scan import triton_scan as tri
from visionkit.ops.selective_scan.inputs import ScanInputs, kernel_layout

BLOCK_LS = (32, 64, 128, 256)
BLOCK_DS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8)


def scan_inputs(inputs: dict) -> ScanInputs:
    return kernel_layout(ScanInputs(**inputs, delta_softplus=True))


def candidates(shape: str) -> list[tuple[str, int, int, int]]:
    """(pass, block_l, block_d, warps) launch shapes to try for one shape."""
    _, dim, _, n, groups, _ = SHAPES[shape]
    block_n = tri._next_power_of_2(n)
    out = []
    for which, block_l, block_d, warps in itertools.product(("fwd", "bwd"), BLOCK_LS, BLOCK_DS, WARPS):
        tile = block_d * block_n * block_l
        if (dim // groups) % block_d or tile < 32 * warps or tile > 4096:
            continue
        out.append((which, block_l, block_d, warps))
    return out


def kernel_for(block_l: int, fwd: tuple[int, int], bwd: tuple[int, int]) -> tri._TritonScanKernel:
    return tri._TritonScanKernel(training=True, tiles=tri._Tiles(block_l, *fwd, *bwd))


def default_tiles(shape: str, device: torch.device) -> tri._Tiles:
    batch, dim, length, n, groups, _ = SHAPES[shape]
    return tri._tile_shape(batch, dim, n, length, dim // groups, device, training=True)


def pass_fn(shape: str, inputs: dict, which: str, block_l: int, block_d: int, warps: int):
    """A no-argument function running one kernel with the given launch shape (the other kernel uses the default)."""
    d = default_tiles(shape, inputs["u"].device)
    kernel = kernel_for(block_l, (block_d, warps), (d.bwd_block_d, d.bwd_warps))
    if which == "bwd":
        kernel = kernel_for(block_l, (d.fwd_block_d, d.fwd_warps), (block_d, warps))
    x = scan_inputs(inputs)
    if which == "fwd":
        return lambda: kernel.forward(x)
    _, _, saved = kernel.forward(x)
    dout = torch.randn_like(inputs["u"])
    return lambda: kernel.backward(x, saved, dout)


def _compile_worker(job: tuple[str, tuple]) -> str | None:
    shape, cand = job
    try:
        pass_fn(shape, make_inputs(*SHAPES[shape]), *cand)()
        torch.cuda.synchronize()
    except Exception as exc:  # reported, and the variant is skipped by the timing loop
        return f"{shape} {cand}: {type(exc).__name__}: {exc}"
    return None


def gpu_ms(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def profile(shape: str, repeats: int = 10) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = make_inputs(*SHAPES[shape])
    for backend in ("triton", "torch"):
        wall = time_ms(lambda b=backend: run(inputs, b, True), 20)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                run(inputs, backend, True)
            torch.cuda.synchronize()
        # kernels, copies and memsets (a CPU op's self device time repeats the kernels it launched)
        events = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
        kernel_us = sum(e.self_device_time_total for e in events) / repeats
        print(
            f"[profile] {shape} {backend}: wall {wall:.3f} ms per fwd+bwd, kernels {kernel_us / 1e3:.3f} ms on the GPU"
        )
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:6]:
            name = e.key if len(e.key) < 60 else e.key[:57] + "..."
            print(f"    GPU {e.self_device_time_total / repeats:9.1f} us  x{e.count // repeats:<3} {name}")
        host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        cpu_us = sum(e.self_cpu_time_total for e in host) / repeats
        print(f"    host: {cpu_us / 1e3:.3f} ms of profiled CPU time per call; largest self times:")
        for e in host[:8]:
            name = e.key if len(e.key) < 60 else e.key[:57] + "..."
            print(f"    CPU {e.self_cpu_time_total / repeats:9.1f} us  x{e.count // repeats:<3} {name}")


def sweep(shape: str, workers: int, log) -> tuple[tri._Tiles, float]:
    cands = candidates(shape)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for err in pool.imap_unordered(_compile_worker, [(shape, c) for c in cands]):
                if err:
                    print("[compile]", err, file=log)
    inputs = make_inputs(*SHAPES[shape])
    times: dict[tuple[str, int, int, int], float] = {}
    for cand in cands:
        try:
            times[cand] = gpu_ms(pass_fn(shape, inputs, *cand))
        except Exception as exc:
            print(f"[time] {shape} {cand}: {type(exc).__name__}: {exc}", file=log)
            continue
        print(f"{shape} {cand} {times[cand]:.4f} ms", file=log)
    d = default_tiles(shape, inputs["u"].device)
    d_fwd = times.get(("fwd", d.block_l, d.fwd_block_d, d.fwd_warps), float("nan"))
    d_bwd = times.get(("bwd", d.block_l, d.bwd_block_d, d.bwd_warps), float("nan"))
    print(f"[sweep] {shape}: default {tuple(d)}: fwd {d_fwd:.4f} + bwd {d_bwd:.4f} = {d_fwd + d_bwd:.4f} ms (GPU)")
    best: tuple[float, tri._Tiles] | None = None
    for block_l in BLOCK_LS:
        per = {}
        for which in ("fwd", "bwd"):
            opts = [(t, c) for c, t in times.items() if c[0] == which and c[1] == block_l]
            if opts:
                per[which] = min(opts)
        if len(per) < 2:
            continue
        (tf, cf), (tb, cb) = per["fwd"], per["bwd"]
        tiles = tri._Tiles(block_l, cf[2], cf[3], cb[2], cb[3])
        top = sorted((t, c[2], c[3]) for c, t in times.items() if c[0] == "bwd" and c[1] == block_l)[:3]
        print(f"[sweep] {shape} BLOCK_L {block_l:>3}: best fwd (d {cf[2]}, w {cf[3]}) {tf:.4f} ms, "
              f"best bwd (d {cb[2]}, w {cb[3]}) {tb:.4f} ms, sum {tf + tb:.4f}; bwd top 3 {top}")  # fmt: skip
        if best is None or tf + tb < best[0]:
            best = (tf + tb, tiles)
    assert best is not None, f"no launch shape ran for {shape}"
    return best[1], best[0]


def end_to_end(shape: str, tiles: tri._Tiles, repeats: int) -> None:
    """selective_scan fwd+bwd wall time (CUDA events) with the default launch shapes and with ``tiles``."""
    inputs = make_inputs(*SHAPES[shape])
    default_kernel = tri._TRAINING_KERNEL
    t_default = time_ms(lambda: run(inputs, "triton", True), repeats)
    tri._TRAINING_KERNEL = tri._TritonScanKernel(training=True, tiles=tiles)
    try:
        t_best = time_ms(lambda: run(inputs, "triton", True), repeats)
    finally:
        tri._TRAINING_KERNEL = default_kernel
    t_torch = time_ms(lambda: run(inputs, "torch", True), repeats)
    print(f"[e2e] {shape}: fwd+bwd wall: torch {t_torch:.3f} ms; triton default {t_default:.3f} ms "
          f"({t_torch / t_default:.1f}x); triton {tuple(tiles)} {t_best:.3f} ms ({t_torch / t_best:.1f}x)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="stage1,stage3,stage1_4096")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the variants (1: compile inline)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--log", default="selective_scan_gpu_tune.log", help="file for every variant's time")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/selective_scan_gpu_tune.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    shapes = args.shapes.split(",")
    for shape in shapes:
        profile(shape)
    if args.no_sweep:
        return 0
    with open(args.log, "w") as log:
        for shape in shapes:
            tiles, ms = sweep(shape, args.workers, log)
            print(f"[sweep] {shape}: best {tuple(tiles)} {ms:.4f} ms (GPU, fwd + bwd kernels)")
            end_to_end(shape, tiles, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
