"""Benchmark: selective-scan backends on the CPU (reference vs torch vs numba), side by side in one process.

For each shape and backend it times the forward alone (under ``torch.no_grad``) and the forward + backward (gradients
of all inputs), as the median of ``--repeats`` runs after one untimed warm-up (the warm-up absorbs numba's compile or
cache load). The sequential reference needs no warm-up and its forward + backward takes minutes at the LM-like shape,
so by default it gets a single timed forward + backward (``--reference-repeats``); ``--reference-threads`` sets its
torch threads (the reference's many tiny ops slow down badly with 2 threads on a shared 2-core machine). Ratios are
reference time / backend time.

Memory, two numbers per backend and shape:
  * ``saved MB``: bytes of the tensors autograd keeps for the backward, not counting the inputs (from
    ``torch.autograd.graph.saved_tensors_hooks`` in a separate untimed forward; storages counted once);
  * ``peak MB``: peak resident-set growth during the last timed forward + backward, measured by resetting the
    kernel's high-water mark (``/proc/self/clear_refs``) and reading ``VmHWM`` - ``VmRSS`` from ``/proc/self/status``;
    glibc's mmap threshold is pinned at 64 KiB so freed tensors go back to the OS (Linux only).

Inputs are realistic (mamba's tests / VMamba init): fp32, seed 0, A = -exp(log(1..N)) per channel, delta ≈ raw
dt_proj output around softplus⁻¹(0.001 … 0.1), delta_softplus=True, D = 1, delta_bias, no z.

Usage::

    .venv/bin/python bench/selective_scan.py --repeats 3 --threads 2 --reference-threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

from visionkit.ops import selective_scan

SHAPES = {  # name: (batch, dim, L, N, groups) (shared/reference/mamba.md §6 and the Mamba-LM block defaults, §2)
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


def time_backend(
    backend: str, inputs: dict[str, torch.Tensor], repeats: dict[str, int], warmup: bool
) -> dict[str, float]:
    """Median seconds of the forward and of the forward + backward, peak RSS growth and saved bytes."""

    def forward() -> None:
        with torch.no_grad():
            selective_scan(**inputs, delta_softplus=True, backend=backend)

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def forward_backward() -> None:
        for v in leaves.values():
            v.grad = None
        out = selective_scan(**leaves, delta_softplus=True, backend=backend)
        out.backward(torch.ones_like(out))

    result = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        if warmup:
            fn()
        times, peak, last = [], 0.0, repeats[name] - 1
        for i in range(repeats[name]):
            base = _reset_peak() if i == last else 0
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if i == last:
                peak = (_status_kib("VmHWM") - base) / 1024
        result[name] = statistics.median(times)
        result[f"{name} peak MB"] = peak
    result["saved MB"] = (
        saved_bytes(lambda x: selective_scan(**x, delta_softplus=True, backend=backend), inputs) / 2**20
    )
    return result


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
    args = parser.parse_args()
    backends = args.backends.split(",")
    torch.set_num_threads(args.threads)
    if "numba" in backends:
        import numba

        numba.set_num_threads(args.threads)
    pinned = _pin_malloc()
    ref_threads = args.reference_threads or args.threads
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads")
    print(f"(reference: {ref_threads} torch thread(s));")
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start; fp32, seed 0")
    print(f"median of {args.repeats} after 1 warm-up (reference fwd+bwd: {args.reference_repeats} run, no warm-up)")
    print(f"memory: saved = autograd-saved bytes beyond the inputs; peak = VmHWM - VmRSS (malloc pinned: {pinned})\n")

    header = f"{'shape':<8}{'backend':<11}{'fwd s':>9}{'x ref':>8}{'fwd+bwd s':>11}{'x ref':>8}"
    header += f"{'saved MB':>10}{'peak MB':>9}"
    print(header)
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        inputs = make_inputs(*shape)
        ref: dict[str, float] = {}
        for backend in backends:
            is_ref = backend == "reference"
            torch.set_num_threads(args.reference_threads or args.threads if is_ref else args.threads)
            repeats = {"fwd": args.repeats, "fwd+bwd": args.reference_repeats if is_ref else args.repeats}
            r = time_backend(backend, inputs, repeats, warmup=not is_ref)
            if is_ref:
                ref = r
            print(
                f"{shape_name:<8}{backend:<11}{r['fwd']:9.4f}{_ratio(ref, r, 'fwd')}{r['fwd+bwd']:11.4f}"
                f"{_ratio(ref, r, 'fwd+bwd')}"
                f"{r['saved MB']:10.1f}{r['fwd+bwd peak MB']:9.1f}",
                flush=True,
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
