"""The scan's input record, its shape checks and the dtype rules every selective-scan backend shares.

Every entry point validates its arguments exactly once, by building a :class:`ScanInputs` and calling
:meth:`ScanInputs.validated`; the backends then take the record as it is (``docs/ops/selective_scan.md``, "Inputs").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TENSOR_FIELDS",
    "ScanInputs",
    "ScanOutput",
    "canonical_bc",
    "compute_dtype",
    "expand_bc",
    "finish_output",
    "kernel_layout",
    "prepare_delta",
]

#: What a selective scan returns: ``out`` (batch, dim, L), or ``(out, last_state)`` with last_state (batch, dim, N).
ScanOutput = Tensor | tuple[Tensor, Tensor]

#: The record's tensor fields in the order of mamba_ssm's ``selective_scan_fn`` (and of the gradients a kernel returns).
TENSOR_FIELDS: tuple[str, ...] = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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


class ScanInputs(NamedTuple):
    """The arguments of one scan call (those of :func:`visionkit.ops.selective_scan` without ``return_last_state``).

    Each field holds the argument of the same name (shapes in :func:`~visionkit.ops.selective_scan`'s docstring).
    Built and validated once per call by the entry point; the kernels read the fields by name. Between
    :func:`kernel_layout` and the kernels every tensor is contiguous and B / C are time-invariant (dim, N) or grouped
    (batch, G, N, L) (a 3-D B / C arrives with G = 1).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    delta_bias: Tensor | None = None
    delta_softplus: bool = False

    def validated(self) -> ScanInputs:
        """Check the shapes of every input.

        Returns:
            The record itself.

        Raises:
            ValueError: On a bad shape or a complex A / B / C; the message names the argument and its shape.
        """
        u = self.u
        if u.dim() != 3:
            raise ValueError(f"u must have shape (batch, dim, L), got {u.dim()}-D shape {_shape(u)}")
        batch, dim, length = u.shape
        if _shape(self.delta) != _shape(u):
            raise ValueError(f"delta must have the shape of u (batch, dim, L) = {_shape(u)}, got {_shape(self.delta)}")
        A = self.A
        if A.is_complex():
            raise ValueError(f"A must be real; complex A is not supported, got dtype {A.dtype}")
        if A.dim() != 2 or A.shape[0] != dim:
            raise ValueError(f"A must have shape (dim, N) with dim={dim}, got {_shape(A)}")
        n = A.shape[1]
        _check_bc("B", self.B, batch, dim, n, length)
        _check_bc("C", self.C, batch, dim, n, length)
        if self.D is not None and _shape(self.D) != (dim,):
            raise ValueError(f"D must have shape (dim,) = {(dim,)}, got {_shape(self.D)}")
        if self.z is not None and _shape(self.z) != _shape(u):
            raise ValueError(f"z must have the shape of u (batch, dim, L) = {_shape(u)}, got {_shape(self.z)}")
        if self.delta_bias is not None and _shape(self.delta_bias) != (dim,):
            raise ValueError(f"delta_bias must have shape (dim,) = {(dim,)}, got {_shape(self.delta_bias)}")
        return self

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The tensor fields in :data:`TENSOR_FIELDS` order (absent optional inputs as None)."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor | None, ...], delta_softplus: bool) -> ScanInputs:
        """The record of ``tensors`` given in :data:`TENSOR_FIELDS` order (the inverse of :meth:`tensors`)."""
        return cls(**dict(zip(TENSOR_FIELDS, tensors, strict=True)), delta_softplus=delta_softplus)


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
    # group g covers channels g·dim/G … (g+1)·dim/G − 1 (docs/ops/selective_scan.md, "Inputs")
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


def kernel_layout(inputs: ScanInputs) -> ScanInputs:
    """The record as the kernels take it: every tensor contiguous, B / C through :func:`canonical_bc`."""

    def contiguous(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    return ScanInputs(
        u=inputs.u.contiguous(),
        delta=inputs.delta.contiguous(),
        A=inputs.A.contiguous(),
        B=canonical_bc(inputs.B),
        C=canonical_bc(inputs.C),
        D=contiguous(inputs.D),
        z=contiguous(inputs.z),
        delta_bias=contiguous(inputs.delta_bias),
        delta_softplus=bool(inputs.delta_softplus),
    )
