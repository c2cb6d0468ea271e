"""Selective scan on an NVIDIA GPU: the "triton" backend against the "torch" backend (and the reference for errors).

Run by ``bench/gpu_check.sh``. For each shape it checks the Triton output and the gradients of all inputs against the
sequential reference (fp32, on the GPU), then times forward and forward+backward of both backends side by side
(CUDA events, median of ``--repeats`` after warm-up) and prints the ratio, plus the Triton forward's achieved memory
bandwidth (bytes it must read and write once / time) against a device-to-device copy measured in the same run and the
card's nominal peak. Each time is given twice: wall (CUDA events around the Python call, so host overhead counts) and
GPU (the summed durations of the call's kernels from ``torch.profiler``, which is what a network that keeps the GPU
queued pays).

Usage::

    python bench/selective_scan_gpu.py [--repeats 20] [--shapes stage1,stage3,lm,stage1_4096,lm_4096]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from visionkit.ops import selective_scan

# (batch, dim, L, N, G, z): VMamba-S stage 1 / 3 scans (4 directions x d_inner, d_state 1, 4 groups;
# docs/models/vmamba.md, "Per-stage shapes") and a Mamba-LM-like layer (d_inner 1536, d_state 16, z gate), plus both
# at L = 4096.
SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "stage1": (2, 768, 3136, 1, 4, False),
    "stage3": (2, 3072, 196, 1, 4, False),
    "lm": (2, 1536, 1024, 16, 1, True),
    "stage1_4096": (2, 768, 4096, 1, 4, False),
    "lm_4096": (2, 1536, 4096, 16, 1, True),
}

# Nominal HBM bandwidth (vendor data sheets), bytes/s; the measured copy bandwidth is printed next to it.
NOMINAL_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100": 3.35e12, "H200": 4.8e12}


def make_inputs(batch: int, dim: int, length: int, n: int, groups: int, with_z: bool, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device="cuda")

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5 - 2.0,  # softplus(delta + bias) ~ 0.1 .. 0.5
        "A": -torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(dim, 1),  # mamba_init: A = -(1..N)
        "B": randn(batch, groups, n, length),
        "C": randn(batch, groups, n, length),
        "D": torch.ones(dim, device="cuda"),
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": rand(dim) * 0.5,
    }


def leaf(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}


def run(inputs: dict, backend: str, backward: bool) -> tuple[torch.Tensor, dict]:
    x = leaf(inputs) if backward else inputs
    out = selective_scan(**x, delta_softplus=True, backend=backend)
    if backward:
        out.backward(torch.ones_like(out))
    return out, x


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_ms(fn, repeats: int) -> float:
    """GPU busy time of one call: the durations of its kernels, copies and memsets (``torch.profiler``), summed.

    Unlike :func:`time_ms` this leaves out the gaps in which the GPU waits for the host (Python, autograd, launches),
    which a whole network hides by queueing work ahead but an isolated call does not.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    # device-side events only: a CPU op's self device time repeats the kernels it launched
    device = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
    return sum(e.self_device_time_total for e in device) / repeats / 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def check(name: str, inputs: dict) -> bool:
    ref, ref_x = run(inputs, "reference", True)
    out, tri_x = run(inputs, "triton", True)
    errs = {"out": max_rel_err(out, ref)}
    for k, v in ref_x.items():
        if v is not None:
            errs["d" + k] = max_rel_err(tri_x[k].grad, v.grad)
    ok = all(e < 1e-3 for e in errs.values())
    print(f"[check] {name}: max |triton - reference| / max |reference|: "
          + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()) + ("  OK" if ok else "  FAIL (> 1e-3)"))  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the reference")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/selective_scan_gpu.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in props.name), float("nan"))
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (nominal HBM peak {nominal / 1e12:.2f} TB/s)")

    names = args.shapes.split(",")
    all_ok = True
    if not args.no_check:
        for name in names:
            if "4096" not in name:  # the reference's Python loop at L = 4096 adds time and nothing new
                all_ok &= check(name, make_inputs(*SHAPES[name]))

    print("wall = CUDA events around the call (host overhead included); GPU = summed kernel time (torch.profiler)")
    header = (f"{'shape (batch, dim, L, N, G)':<32} {'pass':<8} {'torch ms':>9} {'triton ms':>10} {'ratio':>7} "
              f"{'GPU torch':>10} {'GPU triton':>11} {'ratio':>7} {'triton GB/s':>12} {'of copy':>8}")  # fmt: skip
    print(header)
    for name in names:
        batch, dim, length, n, groups, with_z = SHAPES[name]
        inputs = make_inputs(batch, dim, length, n, groups, with_z)
        label = f"{name} {(batch, dim, length, n, groups)}"
        for backward in (False, True):
            t_torch = time_ms(lambda b=backward, x=inputs: run(x, "torch", b), args.repeats)
            t_triton = time_ms(lambda b=backward, x=inputs: run(x, "triton", b), args.repeats)
            k_torch = kernel_ms(lambda b=backward, x=inputs: run(x, "torch", b), args.repeats)
            k_triton = kernel_ms(lambda b=backward, x=inputs: run(x, "triton", b), args.repeats)
            extra = ""
            if not backward:
                # bytes the forward must move once: u, delta, (z) read, out written, B and C read (fp32), over the
                # triton forward's GPU time
                elems = batch * dim * length * (3 + with_z) + 2 * batch * groups * n * length
                bw = elems * 4 / (k_triton * 1e-3)
                extra = f"{bw / 1e9:>12.0f} {bw / copy_bw:>8.0%}"
            pass_name = "fwd+bwd" if backward else "fwd"
            print(f"{label:<32} {pass_name:<8} {t_torch:>9.3f} {t_triton:>10.3f} {t_torch / t_triton:>6.1f}x "
                  f"{k_torch:>10.3f} {k_triton:>11.3f} {k_torch / k_triton:>6.1f}x {extra}")  # fmt: skip
    print("correctness:", "OK" if all_ok else "FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
