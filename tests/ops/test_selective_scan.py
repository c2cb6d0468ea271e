"""Tests for visionkit.ops.selective_scan.

Tolerances follow mamba's tests/ops/test_selective_scan.py (see /work/shared/reference/mamba.md §4).
"""

import math

import pytest
import torch

from visionkit.ops.selective_scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

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


def run_both(inputs, softplus, last_state, chunk_size):
    ref_in, tor_in = clone_inputs(inputs), clone_inputs(inputs)
    ref = selective_scan_reference(**ref_in, delta_softplus=softplus, return_last_state=last_state)
    tor = selective_scan_chunked(**tor_in, delta_softplus=softplus, return_last_state=last_state, chunk_size=chunk_size)
    return ref_in, ref, tor_in, tor


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize(("bc", "groups"), [("ti", 1), ("var", 0), ("var", 1), ("var", 2), ("var", 4)])
@pytest.mark.parametrize(("length", "chunk_size"), [(37, 8), (70, 64), (256, 64)])
def test_torch_matches_reference_values_and_grads(n, bc, groups, length, chunk_size):
    inputs = make_inputs(length=length, n=n, bc=bc, groups=groups, seed=n + groups + length)
    ref_in, (ref, ref_h), tor_in, (tor, tor_h) = run_both(inputs, True, True, chunk_size)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(tor, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(tor_h, ref_h, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    ref.backward(g)
    tor.backward(g)
    for name, v in ref_in.items():
        r, a = grad_tols(name, rtol, atol, bc == "ti", True)
        torch.testing.assert_close(tor_in[name].grad, v.grad, rtol=r, atol=a, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("has_d", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs(has_z, has_d, has_bias, softplus):
    inputs = make_inputs(length=21, n=4, groups=2, has_d=has_d, has_z=has_z, has_bias=has_bias)
    ref_in, ref, tor_in, tor = run_both(inputs, softplus, False, 8)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(tor, ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    ref.backward(g)
    tor.backward(g)
    for name, v in ref_in.items():
        if v is None:
            assert tor_in[name] is None
            continue
        r, a = grad_tols(name, rtol, atol, False, has_z)
        torch.testing.assert_close(tor_in[name].grad, v.grad, rtol=r, atol=a)


def test_default_chunk_and_backends_agree():
    inputs = make_inputs(length=130, n=16, groups=2, requires_grad=False)
    ref, ref_h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="reference")
    for backend in ("torch", "auto"):
        out, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)
        torch.testing.assert_close(h, ref_h, rtol=6e-4, atol=2e-3)
    out = selective_scan(**inputs, delta_softplus=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 130)


def test_large_decay_no_overflow():
    # |Δ·A| summed over a chunk far above 88: log-space cumsum would overflow, the multiplicative scan must not
    inputs = make_inputs(length=100, n=16, requires_grad=False)
    inputs["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(4, 1)
    inputs["delta"] = inputs["delta"] + 2.0
    ref = selective_scan_reference(**inputs)
    out = selective_scan_chunked(**inputs, chunk_size=64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)


def test_gradcheck_float64():
    inputs = make_inputs(batch=1, dim=2, length=5, n=2, groups=2, dtype=torch.float64, seed=3)
    names = list(inputs)

    def fn(*args):
        kw = dict(zip(names, args, strict=True))
        out, h = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk_size=2)
        return out, h

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))

    ti = make_inputs(batch=1, dim=2, length=4, n=2, bc="ti", has_z=False, dtype=torch.float64, seed=4)
    ti_names = [k for k, v in ti.items() if v is not None]

    def fn_ti(*args):
        return selective_scan(**dict(zip(ti_names, args, strict=True)), backend="torch")

    assert torch.autograd.gradcheck(fn_ti, tuple(ti[k] for k in ti_names))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_half_inputs_return_input_dtype(dtype, backend):
    inputs = make_inputs(length=19, n=4, groups=2, dtype=dtype, requires_grad=False)
    out, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    assert out.dtype == dtype
    assert h.dtype == torch.float32
    ref32 = selective_scan_reference(
        **{k: (v.float() if v is not None else None) for k, v in inputs.items()}, delta_softplus=True
    )
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref32, rtol=rtol, atol=atol)


def test_half_backward_runs():
    inputs = make_inputs(length=9, n=2, dtype=torch.bfloat16)
    out = selective_scan(**inputs, delta_softplus=True)
    out.float().sum().backward()
    assert inputs["u"].grad.dtype == torch.bfloat16
    assert inputs["A"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hand_worked_example(backend):
    # dim 1, N 1, L 3; A = -ln 2 and Δ = 1 give a_t = 1/2; B = 2, C = 3, D = 0.5, u = [1, 2, 3]
    # h1 = 0.5·0 + 1·2·1 = 2;  h2 = 0.5·2 + 1·2·2 = 5;  h3 = 0.5·5 + 1·2·3 = 8.5
    # y = 3·h + 0.5·u = [6.5, 16, 27]
    f64 = torch.float64
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=f64)
    delta = torch.ones(1, 1, 3, dtype=f64)
    A = torch.tensor([[-math.log(2.0)]], dtype=f64)
    B = torch.tensor([[2.0]], dtype=f64)
    C = torch.tensor([[3.0]], dtype=f64)
    D = torch.tensor([0.5], dtype=f64)
    out, h = selective_scan(u, delta, A, B, C, D=D, return_last_state=True, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[[6.5, 16.0, 27.0]]], dtype=f64))
    torch.testing.assert_close(h, torch.tensor([[[8.5]]], dtype=f64))
    # with a gate z = 0, silu(0) = 0 kills the output; with variable B (batch, N, L) = [2, 2, 2] nothing changes
    out_z = selective_scan(u, delta, A, B, C, D=D, z=torch.zeros_like(u), backend=backend)
    torch.testing.assert_close(out_z, torch.zeros_like(u))
    out_v = selective_scan(u, delta, A, B.expand(1, 3).reshape(1, 1, 3), C, D=D, backend=backend)
    torch.testing.assert_close(out_v, torch.tensor([[[6.5, 16.0, 27.0]]], dtype=f64))


def test_bad_backend_messages():
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    with pytest.raises(ValueError, match="unknown selective_scan backend 'cuda'"):
        selective_scan(**inputs, backend="cuda")
    for name in ("triton", "mamba_ssm"):
        with pytest.raises(RuntimeError, match=f"'{name}' is not implemented yet"):
            selective_scan(**inputs, backend=name)


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("u", torch.zeros(2, 4), r"u must have shape \(batch, dim, L\).*\(2, 4\)"),
        ("delta", torch.zeros(2, 4, 6), r"delta must have the shape of u.*\(2, 4, 6\)"),
        ("A", torch.zeros(3, 2), r"A must have shape \(dim, N\).*\(3, 2\)"),
        ("A", torch.zeros(4, 2, dtype=torch.complex64), r"A must be real"),
        ("B", torch.zeros(4, 3), r"time-invariant B must have shape.*\(4, 3\)"),
        ("B", torch.zeros(2, 3, 5), r"variable B must have shape.*\(2, 3, 5\)"),
        ("C", torch.zeros(2, 3, 2, 5), r"C has G=3 groups.*not divisible"),
        ("C", torch.zeros(2, 1, 2, 4), r"grouped C must have shape.*\(2, 1, 2, 4\)"),
        ("C", torch.zeros(2), r"C must be .*1-D shape \(2,\)"),
        ("D", torch.zeros(3), r"D must have shape \(dim,\).*\(3,\)"),
        ("z", torch.zeros(2, 4, 4), r"z must have the shape of u.*\(2, 4, 4\)"),
        ("delta_bias", torch.zeros(4, 1), r"delta_bias must have shape \(dim,\).*\(4, 1\)"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_shapes(name, value, pattern, backend):
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    inputs[name] = value
    with pytest.raises(ValueError, match=pattern):
        selective_scan(**inputs, backend=backend)


def test_bad_chunk_size():
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**inputs, chunk_size=0)
