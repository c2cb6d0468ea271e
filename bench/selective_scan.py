"""Benchmark: selective-scan backends on the CPU (reference vs torch vs numba), side by side in one process.

For each shape and backend it times the forward alone (under ``torch.no_grad``) and the forward + backward (gradients
of all inputs), as the median of ``--repeats`` runs after one untimed warm-up (the warm-up absorbs numba's compile or
cache load). The sequential reference needs no warm-up and its forward + backward takes minutes at the LM-like shape,
so by default it gets a single timed forward + backward (``--reference-repeats``); ``--reference-threads`` sets its
torch threads (the reference's many tiny ops slow down badly with 2 threads on a shared 2-core machine). Ratios are
reference time / backend time.

Timings run with glibc's malloc defaults (as in any program: a large tensor freed and allocated again reuses pages
already mapped); ``--pinned-timing`` times with the mmap threshold pinned as in the memory pass instead.

Memory, two numbers per backend and shape, from a fresh Python process per shape started after all timings:
  * ``saved MB``: bytes of the tensors autograd keeps for the backward, not counting the inputs (from
    ``torch.autograd.graph.saved_tensors_hooks`` in a separate untimed forward; storages counted once);
  * ``peak MB``: peak resident-set growth during one forward + backward (after one warm-up call whose gradients are
    dropped before the measurement): the kernel's high-water mark is reset (``/proc/self/clear_refs``), then
    ``VmHWM`` - ``VmRSS`` is read from ``/proc/self/status``. That process pins glibc's mmap threshold at 64 KiB from
    its start, so that freed tensors go back to the OS and the mark sees each call's own allocations (Linux only).

Inputs are realistic (mamba's tests / VMamba init): fp32, seed 0, A = -exp(log(1..N)) per channel, delta ≈ raw
dt_proj output around softplus⁻¹(0.001 … 0.1), delta_softplus=True, D = 1, delta_bias, no z.

Usage::

    .venv/bin/python bench/selective_scan.py --repeats 5 --threads 2 --reference-threads 2 --reference-repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from visionkit.ops import selective_scan

# name: (batch, dim, L, N, groups): docs/models/vmamba.md, "Per-stage shapes", and the Mamba-LM block defaults
# (docs/ops/selective_scan.md, "Definition")
SHAPES = {
    "stage1": (2, 768, 3136, 1, 4),  # VMamba-S stage 1: 4 directions x d_inner 192, 56x56 tokens
    "stage3": (2, 3072, 196, 1, 4),  # VMamba-S stage 3: 4 x 768, 14x14 tokens
    "lm": (2, 1536, 1024, 16, 1),  # Mamba-LM-like: d_inner 1536, d_state 16, one B / C for all channels
}


def make_inputs(batch: int, dim: int, length: int, n: int, groups: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # dt log-uniform in [1e-3, 0.1] (mamba_init); delta_bias = softplus⁻¹(dt) and delta ~ a small raw projection
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.1 * torch.randn(batch, dim, length, generator=g),
        "A": -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32))).repeat(dim, 1),
        "B": torch.randn(batch, groups, n, length, generator=g),
        "C": torch.randn(batch, groups, n, length, generator=g),
        "D": torch.ones(dim),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _pin_malloc() -> bool:
    """Fix glibc's mmap threshold (64 KiB) so freed tensors leave the resident set; False where unsupported."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 128 * 1024))  # M_MMAP / M_TRIM_THRESHOLD
    except OSError:
        return False


def _reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    return _status_kib("VmRSS")


def saved_bytes(fn: Callable[[dict], torch.Tensor], inputs: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for the backward in one forward, excluding the inputs' own storages."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    seen = {v.untyped_storage().data_ptr() for v in leaves.values()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaves)
    return total


def _runners(backend: str, inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    """The two timed calls: forward under ``no_grad`` and forward + backward (gradients of all inputs).

    The forward + backward first drops the previous call's gradients (as ``zero_grad(set_to_none=True)`` would);
    ``"clear"`` does only that.
    """

    def forward() -> None:
        with torch.no_grad():
            selective_scan(**inputs, delta_softplus=True, backend=backend)

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def clear() -> None:
        for v in leaves.values():
            v.grad = None

    def forward_backward() -> None:
        clear()
        out = selective_scan(**leaves, delta_softplus=True, backend=backend)
        out.backward(torch.ones_like(out))

    return {"fwd": forward, "fwd+bwd": forward_backward, "clear": clear}


def time_backend(
    backend: str, inputs: dict[str, torch.Tensor], repeats: dict[str, int], warmup: bool
) -> dict[str, float]:
    """Median seconds of the forward and of the forward + backward."""
    result = {}
    runners = _runners(backend, inputs)
    for name in ("fwd", "fwd+bwd"):
        fn = runners[name]
        if warmup:
            fn()
        times = []
        for _ in range(repeats[name]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times)
    return result


def memory_backend(backend: str, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Peak resident-set growth (MB) of one forward + backward after a warm-up, and the autograd-saved MB."""
    runners = _runners(backend, inputs)
    runners["fwd+bwd"]()
    runners["clear"]()
    base = _reset_peak()
    runners["fwd+bwd"]()
    return {
        "peak MB": (_status_kib("VmHWM") - base) / 1024,
        "saved MB": saved_bytes(lambda x: selective_scan(**x, delta_softplus=True, backend=backend), inputs) / 2**20,
    }


def _memory_pass(shapes: list[str], backends: list[str], threads: int, ref_threads: int) -> None:
    """Run in a fresh process (``--memory-pass``): the mmap threshold is pinned before any tensor exists, so that
    freed tensors leave the resident set and the high-water mark sees each call's own allocations. Prints one JSON
    line per (shape, backend)."""
    pinned = _pin_malloc()
    for shape_name in shapes:
        inputs = make_inputs(*SHAPES[shape_name])
        for backend in backends:
            torch.set_num_threads(ref_threads if backend == "reference" else threads)
            print(json.dumps({"shape": shape_name, "backend": backend, "pinned": pinned,
                              **memory_backend(backend, inputs)}), flush=True)  # fmt: skip


def _measure_memory(shapes: list[str], backends: list[str], threads: int, ref_threads: int) -> dict:
    """Run :func:`_memory_pass` in one fresh process per shape (a shape measured after a larger one read low)."""
    rows = []
    for shape in shapes:
        cmd = [sys.executable, __file__, "--memory-pass", "--shapes", shape, "--backends", ",".join(backends),
               "--threads", str(threads), "--reference-threads", str(ref_threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {(r["shape"], r["backend"]): r for r in rows}


def _ratio(ref: dict[str, float], r: dict[str, float], key: str) -> str:
    return f"{ref[key] / r[key]:7.1f}x" if ref else f"{'-':>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="reference,torch,numba", help="comma-separated backend names")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of the reference's fwd+bwd")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and numba threads")
    parser.add_argument(
        "--reference-threads", type=int, default=None, help="torch threads while the reference runs (default --threads)"
    )
    parser.add_argument(
        "--pinned-timing",
        action="store_true",
        help="time with glibc's mmap threshold pinned at 64 KiB as well (large tensors page-faulted on every call)",
    )
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backends = args.backends.split(",")
    shapes = args.shapes.split(",")
    torch.set_num_threads(args.threads)
    if "numba" in backends:
        import numba

        numba.set_num_threads(args.threads)
    ref_threads = args.reference_threads or args.threads
    if args.memory_pass:
        _memory_pass(shapes, backends, args.threads, ref_threads)
        return
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads")
    print(f"(reference: {ref_threads} torch thread(s));")
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start; fp32, seed 0")
    print(f"median of {args.repeats} after 1 warm-up (reference fwd+bwd: {args.reference_repeats} run, no warm-up)")
    pinned = _pin_malloc() if args.pinned_timing else False
    malloc = "the mmap threshold pinned (large tensors page-faulted afresh)" if pinned else "glibc malloc defaults"
    print(f"timing with {malloc}")

    results: dict[tuple[str, str], dict[str, float]] = {}
    for shape_name in shapes:
        inputs = make_inputs(*SHAPES[shape_name])
        for backend in backends:
            is_ref = backend == "reference"
            torch.set_num_threads(ref_threads if is_ref else args.threads)
            repeats = {"fwd": args.repeats, "fwd+bwd": args.reference_repeats if is_ref else args.repeats}
            results[shape_name, backend] = time_backend(backend, inputs, repeats, warmup=not is_ref)
            print(f"  timed {shape_name} {backend}", flush=True)
    memory = _measure_memory(shapes, backends, args.threads, ref_threads)
    pinned = all(r["pinned"] for r in memory.values())
    print(f"memory: saved = autograd-saved bytes beyond the inputs; peak = VmHWM - VmRSS of one fwd+bwd "
          f"(fresh process, malloc pinned: {pinned})\n")  # fmt: skip

    header = f"{'shape':<8}{'backend':<11}{'fwd s':>9}{'x ref':>8}{'fwd+bwd s':>11}{'x ref':>8}"
    header += f"{'saved MB':>10}{'peak MB':>9}"
    print(header)
    for shape_name in shapes:
        ref = results.get((shape_name, "reference"), {})
        for backend in backends:
            r = {**results[shape_name, backend], **memory[shape_name, backend]}
            print(
                f"{shape_name:<8}{backend:<11}{r['fwd']:9.4f}{_ratio(ref, r, 'fwd')}{r['fwd+bwd']:11.4f}"
                f"{_ratio(ref, r, 'fwd+bwd')}{r['saved MB']:10.1f}{r['peak MB']:9.1f}"
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
