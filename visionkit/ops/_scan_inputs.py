"""Input checking, dtype rules and the autograd wrapper shared by every selective-scan backend.

Private to :mod:`visionkit.ops`; the public entry point is :func:`visionkit.ops.selective_scan`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_bc(name: str, t: Tensor, batch: int, dim: int, n: int, length: int) -> None:
    """Validate a B or C tensor (time-invariant, variable or grouped)."""
    if t.is_complex():
        raise ValueError(f"{name} must be real; complex B/C are not supported, got dtype {t.dtype}")
    if t.dim() == 2:
        if _shape(t) != (dim, n):
            raise ValueError(f"time-invariant {name} must have shape (dim, N) = {(dim, n)}, got {_shape(t)}")
    elif t.dim() == 3:
        if _shape(t) != (batch, n, length):
            raise ValueError(f"variable {name} must have shape (batch, N, L) = {(batch, n, length)}, got {_shape(t)}")
    elif t.dim() == 4:
        groups = t.shape[1]
        if groups < 1 or _shape(t) != (batch, groups, n, length):
            raise ValueError(
                f"grouped {name} must have shape (batch, G, N, L) = {(batch, 'G', n, length)}, got {_shape(t)}"
            )
        if dim % groups != 0:
            raise ValueError(f"{name} has G={groups} groups (shape {_shape(t)}), but dim={dim} is not divisible by G")
    else:
        raise ValueError(
            f"{name} must be (dim, N), (batch, N, L) or (batch, G, N, L); got {t.dim()}-D shape {_shape(t)}"
        )


def validate_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Check shapes of all scan inputs and raise ``ValueError`` naming the offending argument."""
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {u.dim()}-D shape {_shape(u)}")
    batch, dim, length = u.shape
    if _shape(delta) != _shape(u):
        raise ValueError(f"delta must have the shape of u (batch, dim, L) = {_shape(u)}, got {_shape(delta)}")
    if A.is_complex():
        raise ValueError(f"A must be real; complex A is not supported, got dtype {A.dtype}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim={dim}, got {_shape(A)}")
    n = A.shape[1]
    _check_bc("B", B, batch, dim, n, length)
    _check_bc("C", C, batch, dim, n, length)
    if D is not None and _shape(D) != (dim,):
        raise ValueError(f"D must have shape (dim,) = {(dim,)}, got {_shape(D)}")
    if z is not None and _shape(z) != _shape(u):
        raise ValueError(f"z must have the shape of u (batch, dim, L) = {_shape(u)}, got {_shape(z)}")
    if delta_bias is not None and _shape(delta_bias) != (dim,):
        raise ValueError(f"delta_bias must have shape (dim,) = {(dim,)}, got {_shape(delta_bias)}")


def compute_dtype(u: Tensor) -> torch.dtype:
    """fp16 / bf16 / fp32 compute in fp32 (as ``selective_scan_ref``); fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """Return Δ = softplus(delta + delta_bias) (each step optional), shape (batch, dim, L), in ``dtype``."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def expand_bc(t: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Bring B or C to (dim, N) (time-invariant) or (batch, dim, N, L) (variable; groups repeated per channel)."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        t = t.unsqueeze(1)
    groups = t.shape[1]
    # group g covers channels g·dim/G … (g+1)·dim/G − 1 (mamba.md §1)
    return t.repeat_interleave(dim // groups, dim=1)


def finish_output(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype, dtype: torch.dtype
) -> Tensor:
    """Apply the skip (y += D·u) and the gate (y *= silu(z)), then cast to ``out_dtype``."""
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def canonical_bc(t: Tensor) -> Tensor:
    """Return B or C as (dim, N) (time-invariant) or (batch, G, N, L) (variable; 3-D gets G = 1), contiguous."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.contiguous()


class ScanInputs(NamedTuple):
    """The scan's inputs in kernel layout: validated, contiguous, in their own dtypes.

    ``B`` and ``C`` are time-invariant (dim, N) or grouped (batch, G, N, L) (3-D inputs arrive with G = 1).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    z: Tensor | None
    delta_bias: Tensor | None
    delta_softplus: bool


#: Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype; None where the input is None.
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


class ScanKernel(Protocol):
    """A forward / backward implementation of the selective scan (the torch, numba and Triton backends)."""

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Run the forward pass.

        Returns:
            ``(out, last_state, saved)``: out (batch, dim, L) in u.dtype, last state (batch, dim, N) in the compute
            dtype, and the tensors the backward needs besides the inputs (e.g. per-chunk states).
        """
        ...

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Run the backward pass for the upstream gradient ``dout`` (batch, dim, L).

        Returns:
            The gradients of the eight tensor inputs, each shaped like its input (see :data:`Grads`).
        """
        ...


class _KernelScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        kernel: ScanKernel,
        delta_softplus: bool,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        out, last_state, saved = kernel.forward(ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus))
        ctx.kernel = kernel
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *saved)
        ctx.mark_non_differentiable(last_state)  # like mamba_ssm, the last state's gradient is ignored
        return out, last_state

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: double backward must fail loudly
    def backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, _dlast: Tensor | None) -> tuple:  # type: ignore[override]
        stored = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
        tensors, saved = stored[:8], tuple(stored[8:])
        grads = ctx.kernel.backward(ScanInputs(*tensors, ctx.delta_softplus), saved, dout.contiguous())
        cast = tuple(
            None if g is None or not need else g.to(x.dtype)
            for g, x, need in zip(grads, tensors, ctx.needs_input_grad[2:], strict=True)
        )
        return (None, None, *cast)


def run_scan_kernel(
    kernel: ScanKernel,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Validate the inputs, bring them to the kernel layout and run ``kernel`` under autograd.

    Args: as :func:`visionkit.ops.selective_scan`.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)

    def contiguous(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    out, last_state = _KernelScanFunction.apply(
        kernel,
        bool(delta_softplus),
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        canonical_bc(B),
        canonical_bc(C),
        contiguous(D),
        contiguous(z),
        contiguous(delta_bias),
    )
    return (out, last_state) if return_last_state else out
