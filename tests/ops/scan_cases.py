"""Shared selective-scan test inputs and mamba's test tolerances (mamba tests/ops/test_selective_scan.py)."""

import torch

TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def make_inputs(
    batch=2,
    dim=4,
    length=37,
    n=8,
    bc="var",
    groups=1,
    has_d=True,
    has_z=True,
    has_bias=True,
    dtype=torch.float32,
    seed=0,
    requires_grad=True,
):
    g = torch.Generator().manual_seed(seed)
    wdtype = torch.float32 if dtype != torch.float64 else torch.float64

    def rand(*shape, dt=dtype):
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(dt)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    inputs = {
        "u": randn(batch, dim, length),
        "delta": 0.5 * rand(batch, dim, length),
        "A": -0.5 * rand(dim, n, dt=wdtype),
    }
    if bc == "ti":
        inputs["B"] = randn(dim, n, dt=wdtype)
        inputs["C"] = randn(dim, n, dt=wdtype)
    elif groups == 0:  # plain 3-D variable B/C
        inputs["B"] = randn(batch, n, length)
        inputs["C"] = randn(batch, n, length)
    else:
        inputs["B"] = randn(batch, groups, n, length)
        inputs["C"] = randn(batch, groups, n, length)
    inputs["D"] = randn(dim, dt=wdtype) if has_d else None
    inputs["z"] = randn(batch, dim, length) if has_z else None
    inputs["delta_bias"] = 0.5 * rand(dim, dt=wdtype) if has_bias else None
    if requires_grad:
        for v in inputs.values():
            if v is not None:
                v.requires_grad_(True)
    return inputs


def clone_inputs(inputs):
    return {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}


def grad_tols(name, rtol, atol, time_invariant, has_z):
    # weight tolerances as in mamba's test
    rtolw = atolw = 1e-3
    if has_z:
        rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    return {
        "u": (rtol * 2, atol * 2),
        "delta": (rtol * 5, atol * 10),
        "A": (rtolw, atolw * 5),
        "B": (rtolw, atolw) if time_invariant else (rtol, atol),
        "C": (rtolw, atolw) if time_invariant else (rtol, atol),
        "D": (rtolw, atolw),
        "z": (rtolw, atolw),
        "delta_bias": (rtolw, atolw),
    }[name]
