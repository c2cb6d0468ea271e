"""Mamba selective scan (S6) in pure PyTorch: a sequential reference and a chunked parallel scan.

Semantics follow mamba_ssm's ``selective_scan_ref`` (``mamba_ssm/ops/selective_scan_interface.py``), as specified in
the project's reference notes (``shared/reference/mamba.md``) §1-§2. Per batch b, channel d and state n (h_0 = 0)::

    Δ_t = softplus(delta_t + delta_bias_d)      (softplus only if ``delta_softplus``; bias only if given)
    a_t = exp(Δ_t · A_{d,n})
    h_t = a_t · h_{t-1} + Δ_t · B_{t,n} · u_t
    y_t = Σ_n C_{t,n} · h_{t,n}
    y_t += D_d · u_t                            (if D is given)
    y_t *= silu(z_t)                            (if z is given)

All arithmetic is done in at least float32 (fp16 / bf16 inputs are upcast; float64 stays float64) and the output is cast
back to ``u.dtype``. The last state is returned in the compute dtype, like ``selective_scan_ref``.

Backends:
    * ``"reference"``: a plain Python loop over L (the oracle).
    * ``"torch"``: chunked scan. Within each chunk an inclusive scan of the pairs (a_t, b_t) under
      (a0, b0)∘(a1, b1) = (a1·a0, a1·b0 + b1) is computed by log2(chunk) vectorised doubling (Hillis–Steele) steps in
      multiplicative form (mamba.md §8: log-space cumsum overflows for large |Δ·A|), so every position holds the
      cumulative product of a and the local state; chunks are then combined sequentially by carrying the state.
      The backward pass is plain autograd.
    * ``"auto"``: ``"torch"``.
    * ``"triton"``, ``"mamba_ssm"``: not implemented yet; requesting them raises ``RuntimeError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SELECTIVE_SCAN_BACKENDS",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]

#: Backends accepted by :func:`selective_scan` that are implemented.
SELECTIVE_SCAN_BACKENDS: tuple[str, ...] = ("auto", "reference", "torch")
_PLANNED_BACKENDS: tuple[str, ...] = ("triton", "mamba_ssm")


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


def _validate(
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


def _compute_dtype(u: Tensor) -> torch.dtype:
    """fp16 / bf16 / fp32 compute in fp32 (as ``selective_scan_ref``); fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """Return Δ = softplus(delta + delta_bias) (each step optional), shape (batch, dim, L), in ``dtype``."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _expand_bc(t: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Bring B or C to (dim, N) (time-invariant) or (batch, dim, N, L) (variable; groups repeated per channel)."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        t = t.unsqueeze(1)
    groups = t.shape[1]
    # group g covers channels g·dim/G … (g+1)·dim/G − 1 (mamba.md §1)
    return t.repeat_interleave(dim // groups, dim=1)


def _finish(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype, dtype: torch.dtype
) -> Tensor:
    """Apply the skip (y += D·u) and the gate (y *= silu(z)), then cast to ``out_dtype``."""
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def selective_scan_reference(
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
    """Sequential selective scan, a plain loop over L (same math as mamba_ssm ``selective_scan_ref``).

    Args:
        u: Input sequence, (batch, dim, L).
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real.
        B: Input matrix, (dim, N), (batch, N, L) or (batch, G, N, L) with dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,).
        z: Optional gate, (batch, dim, L); the output is multiplied by silu(z).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with ``last_state`` (batch, dim, N) in the
        compute dtype (float32, or float64 for float64 inputs).
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    dt = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uc = u.to(dtype)
    Ac = A.to(dtype)
    Bc = _expand_bc(B, dim, dtype)
    Cc = _expand_bc(C, dim, dtype)

    h = u.new_zeros((batch, dim, Ac.shape[1]), dtype=dtype)
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        a_t = torch.exp(dt_t * Ac)  # (batch, dim, N)
        B_t = Bc if Bc.dim() == 2 else Bc[..., t]
        C_t = Cc if Cc.dim() == 2 else Cc[..., t]
        h = a_t * h + dt_t * B_t * uc[:, :, t, None]
        ys.append((h * C_t).sum(-1))  # (batch, dim)
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros((batch, dim, 0))
    out = _finish(y, u, D, z, u.dtype, dtype)
    return (out, h) if return_last_state else out


def _chunk_scan(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = a_t·h_{t-1} + b_t along dim 3 by doubling (no in-place ops, autograd friendly).

    Args:
        a: Decays, (batch, dim, n_chunks, Q, N).
        b: Inputs, same shape as ``a``.

    Returns:
        ``(a_cum, h)``: cumulative products of ``a`` and local states (h_{-1} = 0) within each chunk, both shaped like
        ``a``.
    """
    q = a.shape[3]
    k = 1
    while k < q:
        a_hi, a_lo = a.narrow(3, k, q - k), a.narrow(3, 0, q - k)
        b_hi, b_lo = b.narrow(3, k, q - k), b.narrow(3, 0, q - k)
        # (a_lo, b_lo) ∘ (a_hi, b_hi) = (a_hi·a_lo, a_hi·b_lo + b_hi)
        b = torch.cat([b.narrow(3, 0, k), a_hi * b_lo + b_hi], dim=3)
        a = torch.cat([a.narrow(3, 0, k), a_hi * a_lo], dim=3)
        k *= 2
    return a, b


def selective_scan_chunked(
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
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked parallel selective scan in pure PyTorch (the ``"torch"`` backend).

    Same arguments, semantics and outputs as :func:`selective_scan_reference`; additionally:

    Args:
        u: Input sequence, (batch, dim, L).
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real.
        B: Input matrix, (dim, N), (batch, N, L) or (batch, G, N, L) with dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,).
        z: Optional gate, (batch, dim, L).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L, (batch, dim, N).
        chunk_size: Chunk length Q along L; within a chunk the scan is vectorised, chunks are combined sequentially.
            Memory is O(batch·dim·L·N) per doubling step (kept for autograd).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    n = A.shape[1]
    dt = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Bc = _expand_bc(B, dim, dtype)
    Cc = _expand_bc(C, dim, dtype)
    # bring B and C to a layout broadcastable against (batch, dim, L, N)
    Bc = Bc[:, None, :] if Bc.dim() == 2 else Bc.transpose(2, 3)
    Cc = Cc[:, None, :] if Cc.dim() == 2 else Cc.transpose(2, 3)

    a = torch.exp(dt.unsqueeze(-1) * A.to(dtype)[:, None, :])  # (batch, dim, L, N)
    b = (dt * u.to(dtype)).unsqueeze(-1) * Bc  # (batch, dim, L, N)

    q = max(1, min(chunk_size, length))
    n_chunks = -(-length // q) if length > 0 else 0
    pad = n_chunks * q - length
    if pad:
        # identity elements (a = 1, b = 0) leave the state unchanged, so the last state is h_L
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    a = a.reshape(batch, dim, n_chunks, q, n)
    b = b.reshape(batch, dim, n_chunks, q, n)
    a_cum, h_local = _chunk_scan(a, b)

    # sequential combination of chunks: carry_c is the state just before chunk c
    state = u.new_zeros((batch, dim, n), dtype=dtype)
    carries = []
    for c in range(n_chunks):
        carries.append(state)
        state = h_local[:, :, c, -1] + a_cum[:, :, c, -1] * state
    if n_chunks:
        carry = torch.stack(carries, dim=2).unsqueeze(3)  # (batch, dim, n_chunks, 1, N)
        h = (h_local + a_cum * carry).reshape(batch, dim, n_chunks * q, n)[:, :, :length]
    else:
        h = a.new_zeros((batch, dim, 0, n))
    y = (h * Cc).sum(-1)  # (batch, dim, L)
    out = _finish(y, u, D, z, u.dtype, dtype)
    return (out, state) if return_last_state else out


def selective_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the signature and semantics of mamba_ssm ``selective_scan_fn`` / ``selective_scan_ref``.

    Args:
        u: Input sequence, (batch, dim, L); fp32 / fp16 / bf16 (fp64 also accepted).
        delta: Step size, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real (usually negative).
        B: Input matrix: time-invariant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L), dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,): out += u·D.
        z: Optional gate, (batch, dim, L): out *= silu(z).
        delta_bias: Optional bias added to delta before softplus, (dim,).
        delta_softplus: Apply softplus to delta.
        return_last_state: Also return the final state h_L, (batch, dim, N).
        backend: ``"auto"`` (= ``"torch"``), ``"torch"`` (chunked parallel scan) or ``"reference"`` (sequential loop).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype`` (fp32 accumulation), or ``(out, last_state)``.

    Raises:
        ValueError: On a bad shape (the message names the argument and its shape) or an unknown backend.
        RuntimeError: If a known but not yet implemented backend (``"triton"``, ``"mamba_ssm"``) is requested.
    """
    if backend in _PLANNED_BACKENDS:
        raise RuntimeError(
            f"selective_scan backend {backend!r} is not implemented yet; available backends: {SELECTIVE_SCAN_BACKENDS}"
        )
    if backend not in SELECTIVE_SCAN_BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; available backends: {SELECTIVE_SCAN_BACKENDS}")
    kwargs = {
        "D": D,
        "z": z,
        "delta_bias": delta_bias,
        "delta_softplus": delta_softplus,
        "return_last_state": return_last_state,
    }
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, **kwargs)
    return selective_scan_chunked(u, delta, A, B, C, **kwargs)
