"""Tests for visionkit.ops.selective_scan.

Tolerances follow mamba's tests/ops/test_selective_scan.py (docs/ops/selective_scan.md, "Tolerances").
"""

import math

import pytest
import torch

from tests.ops.scan_cases import TOL, clone_inputs, grad_tols, make_inputs
from visionkit.ops import selective_scan, selective_scan_chunked, selective_scan_reference
from visionkit.ops.selective_scan.inputs import ScanInputs
from visionkit.ops.selective_scan.kernel import _KernelScanFunction, run_scan_kernel
from visionkit.ops.selective_scan.torch_chunked import ChunkedScanKernel


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


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_half_backward_runs(backend):
    inputs = make_inputs(length=9, n=2, dtype=torch.bfloat16)
    out = selective_scan(**inputs, delta_softplus=True, backend=backend)
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


def test_bad_backend_messages(monkeypatch):
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    with pytest.raises(ValueError, match="unknown selective_scan backend 'cuda'"):
        selective_scan(**inputs, backend="cuda")
    # CPU tensors: Triton only runs them in its interpreter, mamba_ssm's kernel never does
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is unavailable: the triton backend needs CUDA tensors"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend 'mamba_ssm' is unavailable: mamba_ssm's kernel needs CUDA"):
        selective_scan(**inputs, backend="mamba_ssm")


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
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        selective_scan_chunked(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="max_slice_elements must be >= 1, got 0"):
        ChunkedScanKernel(8, max_slice_elements=0)


@pytest.mark.parametrize(("bc", "groups"), [("ti", 1), ("var", 0), ("var", 2)])
@pytest.mark.parametrize(("length", "chunk_size"), [(37, 8), (40, 8), (9, 1), (1, 8), (0, 8)])
def test_torch_slices_of_chunks_float64(bc, groups, length, chunk_size):
    # max_slice_elements=1 puts every chunk in its own slice, so the carries (h forward, λ backward) cross slices;
    # in float64 the result must equal the sequential reference to rounding
    inputs = make_inputs(length=length, n=3, bc=bc, groups=groups, dtype=torch.float64, seed=length)
    ref_in, tor_in = clone_inputs(inputs), clone_inputs(inputs)
    ref, ref_h = selective_scan_reference(**ref_in, delta_softplus=True, return_last_state=True)
    kernel = ChunkedScanKernel(chunk_size, max_slice_elements=1)
    out, h = run_scan_kernel(kernel, ScanInputs(**tor_in, delta_softplus=True), return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    out.backward(g)
    if length == 0:  # nothing to scan: every gradient is zero
        assert all(not v.grad.any() for v in tor_in.values())
        return
    ref.backward(g)
    for name, v in ref_in.items():
        torch.testing.assert_close(
            tor_in[name].grad, v.grad, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_torch_backward_saves_only_inputs_and_chunk_states():
    # autograd through the doubling steps would keep ~2·log2(Q) tensors of batch·dim·L·N; the hand-written backward
    # keeps the inputs plus one state per chunk
    batch, dim, length, n, chunk = 2, 8, 256, 16, 64
    inputs = make_inputs(batch=batch, dim=dim, length=length, n=n, groups=1)
    saved_numel = []

    def pack(t):
        saved_numel.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=chunk)
    assert type(out.grad_fn) is _KernelScanFunction._backward_cls
    input_numel = sum(v.numel() for v in inputs.values())
    carries_numel = batch * dim * (length // chunk) * n
    assert sum(saved_numel) == input_numel + carries_numel
    assert sum(saved_numel) < batch * dim * length * n  # less than one tensor of the doubling steps
    out.sum().backward()
    assert all(v.grad is not None for v in inputs.values())
