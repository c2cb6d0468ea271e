"""The ``"torch"`` selective-scan backend: a chunked parallel scan in pure PyTorch with its own backward.

Runs on any device with no compile step (it is also the CUDA fallback). The sequence is cut into chunks of Q steps.
Within each chunk an inclusive scan of the pairs (a_t, b_t), a_t = exp(Δ_t·A), b_t = Δ_t·B_t·u_t, under
(a0, b0)∘(a1, b1) = (a1·a0, a1·b0 + b1) is computed by log2(Q) vectorised doubling (Hillis–Steele) steps in
multiplicative form (log-space cumsum overflows for large |Δ·A|: ``docs/ops/selective_scan.md``, "Numerics"); chunks
are then combined sequentially by carrying the state h across chunk boundaries.

Like mamba_ssm's CUDA kernel, the forward saves only the per-chunk carry states, (batch, dim, n_chunks, N), next to
the inputs. The backward (``docs/ops/selective_scan.md``, "Gradient") recomputes h chunk-wise from those carries, runs
the adjoint λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} as the same doubling scan in reverse (carrying λ across chunks from the
end) and applies the gradient formulas. Both passes work on slices of whole chunks, so the (batch, dim, N, time)
temporaries never exceed ``max_slice_elements`` elements each (except that one chunk is always processed whole).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visionkit.ops.selective_scan.inputs import ScanInputs, ScanOutput, compute_dtype, finish_output, prepare_delta
from visionkit.ops.selective_scan.kernel import Grads, run_scan_kernel

__all__ = ["ChunkedScanKernel", "run_chunked", "selective_scan_chunked"]


def _doubling_scan(a: Tensor, b: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = a_t·h_{t-1} + b_t within chunks (last dim) by doubling; consumes ``a`` and ``b``.

    Args:
        a: Decays, (..., Q), contiguous; its storage is reused as a work buffer.
        b: Inputs, same shape as ``a``; its storage is reused as a work buffer.
        reverse: Scan from the end of each chunk instead: h_t = a_t·h_{t+1} + b_t.

    Returns:
        ``(a_cum, h)``: products of ``a`` over the scanned prefix (suffix if ``reverse``) and the local states, with
        zero state entering each chunk; both shaped like ``a``.
    """
    q = a.shape[-1]
    a_new, b_new = torch.empty_like(a), torch.empty_like(b)
    k = 1
    while k < q:
        # step k: every position combines with the one k steps before it (after it when reversed);
        # (a_src, b_src) ∘ (a_tgt, b_tgt) = (a_tgt·a_src, a_tgt·b_src + b_tgt)
        tgt, src = (slice(0, q - k), slice(k, q)) if reverse else (slice(k, q), slice(0, q - k))
        torch.addcmul(b[..., tgt], a[..., tgt], b[..., src], out=b_new[..., tgt])
        torch.mul(a[..., tgt], a[..., src], out=a_new[..., tgt])
        # the first k positions are final; the new buffer (two steps old) already holds the first k // 2 of them
        lo = k // 2 if k > 1 else 0
        keep = slice(q - k, q - lo) if reverse else slice(lo, k)
        a_new[..., keep] = a[..., keep]
        b_new[..., keep] = b[..., keep]
        a, a_new, b, b_new = a_new, a, b_new, b
        k *= 2
    return a, b


def _slab(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last (time) dim of ``x`` to ``size`` (the last slice may end inside its last chunk)."""
    return F.pad(x, (0, size - x.shape[-1])) if size > x.shape[-1] else x


def _slab_bc(m: Tensor, t0: int, t1: int, size: int, dtype: torch.dtype) -> Tensor:
    """B or C for the time steps [t0, t1), zero-padded to ``size`` steps; time-invariant (dim, N) as it is."""
    return m.to(dtype) if m.dim() == 2 else _slab(m[..., t0:t1].to(dtype), size)


def _add_bc_grad(grad: Tensor, part: Tensor, t0: int, t1: int) -> None:
    """Add one slice's gradient of B or C: summed if time-invariant (dim, N), else written at [t0, t1)."""
    if grad.dim() == 2:
        grad += part
    else:
        grad[..., t0:t1] = part[..., : t1 - t0]


def _times_bc(x: Tensor, m: Tensor) -> Tensor:
    """Outer product of x (batch, dim, T) with B or C: (dim, N) or (batch, G, N, T) → (batch, dim, N, T)."""
    batch, dim, t = x.shape
    if m.dim() == 2:
        out = x.new_empty((batch, dim, m.shape[1], t))
        return torch.mul(x[:, :, None, :], m[:, :, None], out=out)
    groups, n = m.shape[1], m.shape[2]
    out = x.new_empty((batch, groups, dim // groups, n, t))
    torch.mul(x.view(batch, groups, dim // groups, 1, t), m[:, :, None], out=out)
    return out.view(batch, dim, n, t)


def _sum_n(x: Tensor, m: Tensor) -> Tensor:
    """Σ_n x·M for x (batch, dim, N, T) and B or C: (dim, N) or (batch, G, N, T) → (batch, dim, T)."""
    batch, dim, n, t = x.shape
    if m.dim() == 2:
        return torch.einsum("bdnt,dn->bdt", x, m)
    groups = m.shape[1]
    prod = x.view(batch, groups, dim // groups, n, t) * m[:, :, None]
    return (prod.sum(3) if n > 1 else prod.squeeze(3)).view(batch, dim, t)


def _sum_channels(x: Tensor, w: Tensor, like: Tensor) -> Tensor:
    """Gradient of B or C (shaped like ``like``) from x (batch, dim, N, T) and w (batch, dim, T): Σ x·w.

    Time-invariant (dim, N): summed over batch and time. Grouped (batch, G, N, T): summed over each group's channels.
    """
    batch, dim, n, t = x.shape
    if like.dim() == 2:
        return torch.einsum("bdnt,bdt->dn", x, w)
    groups = like.shape[1]
    return (x * w[:, :, None]).view(batch, groups, dim // groups, n, t).sum(2)


class ChunkedScanKernel:
    """The ``"torch"`` backend as a :class:`~visionkit.ops.selective_scan.kernel.ScanKernel`.

    Args:
        chunk_size: Chunk length Q along L (>= 1); within a chunk the scan is vectorised, chunks are combined
            sequentially.
        max_slice_elements: Chunks are processed in slices whose (batch, dim, N, time) temporaries have at most this
            many elements (at least one chunk per slice). None: 2^20 (4 MiB in fp32) for CPU tensors, which keeps a
            slice's working set in a typical L3 cache (measured on a 2-core CPU, 2^16 … 2^22 are within ~15 % of
            each other), and 2^26 elsewhere: on a GPU every slice costs a few dozen kernel launches, and small
            slices made the backend 2x slower on an H100 (docs/benchmarks.md).
    """

    def __init__(self, chunk_size: int = 64, max_slice_elements: int | None = None) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_slice_elements is not None and max_slice_elements < 1:
            raise ValueError(f"max_slice_elements must be >= 1, got {max_slice_elements}")
        self.chunk_size = chunk_size
        self.max_slice_elements = max_slice_elements

    def _slices(
        self, batch: int, dim: int, n: int, length: int, device: torch.device
    ) -> tuple[int, int, list[tuple[int, int]]]:
        """Chunk length, number of chunks and the [first, last) chunk ranges of the slices."""
        q = max(1, min(self.chunk_size, length))
        n_chunks = -(-length // q)
        limit = self.max_slice_elements
        if limit is None:
            limit = 1 << 20 if device.type == "cpu" else 1 << 26
        per_slice = max(1, limit // max(1, batch * dim * n * q))
        return q, n_chunks, [(c, min(c + per_slice, n_chunks)) for c in range(0, n_chunks, per_slice)]

    @staticmethod
    def _local_scan(dt: Tensor, A: Tensor, x: Tensor, m: Tensor, q: int, reverse: bool) -> tuple[Tensor, Tensor]:
        """Decays exp(dt·A) and inputs x ⊗ m of one slice, scanned within each chunk.

        Args:
            dt: Step sizes of the slice, (batch, dim, T), T a multiple of ``q``.
            A: State matrix, (dim, N).
            x: Per-channel factor of the inputs, (batch, dim, T).
            m: B or C of the slice, (dim, N) or (batch, G, N, T).
            q: Chunk length.
            reverse: Scan towards the start of each chunk (the adjoint).

        Returns:
            ``(a_cum, h_local)``, each (batch, dim, N, T // q, q).
        """
        batch, dim, t = dt.shape
        a = dt.new_empty((batch, dim, A.shape[1], t))
        torch.mul(dt[:, :, None, :], A[:, :, None], out=a).exp_()
        b = _times_bc(x, m)
        shape = (batch, dim, A.shape[1], t // q, q)
        return _doubling_scan(a.view(shape), b.view(shape), reverse)

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Chunked forward; saves the states entering each chunk, (batch, dim, n_chunks, N) in the compute dtype."""
        u, A, B, C = inputs.u, inputs.A, inputs.B, inputs.C
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = A.shape[1]
        q, n_chunks, slices = self._slices(batch, dim, n, length, u.device)
        Ac = A.to(dtype)
        y = u.new_empty((batch, dim, length), dtype=dtype)
        carries = u.new_empty((batch, dim, n_chunks, n), dtype=dtype)
        state = u.new_zeros((batch, dim, n), dtype=dtype)
        for c0, c1 in slices:
            t0, t1 = c0 * q, min(c1 * q, length)
            size = (c1 - c0) * q
            dt = _slab(prepare_delta(inputs.delta[:, :, t0:t1], inputs.delta_bias, inputs.delta_softplus, dtype), size)
            a_cum, h = self._local_scan(
                dt, Ac, dt * _slab(u[:, :, t0:t1].to(dtype), size), _slab_bc(B, t0, t1, size, dtype), q, False
            )
            for c in range(c1 - c0):
                carries[:, :, c0 + c] = state
                state = torch.addcmul(h[:, :, :, c, -1], a_cum[:, :, :, c, -1], state)
            h.addcmul_(a_cum, carries[:, :, c0:c1].transpose(2, 3)[..., None])
            y[:, :, t0:t1] = _sum_n(h.view(batch, dim, n, -1), _slab_bc(C, t0, t1, size, dtype))[:, :, : t1 - t0]
        out = finish_output(y, u, inputs.D, inputs.z, u.dtype, dtype)
        return out, state, (carries,)

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Gradients (``docs/ops/selective_scan.md``, "Gradient") from the saved carries; see the module docstring."""
        u, delta, A, B, C, D, z = inputs.u, inputs.delta, inputs.A, inputs.B, inputs.C, inputs.D, inputs.z
        delta_softplus = inputs.delta_softplus
        (carries,) = saved
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = A.shape[1]
        q, n_chunks, slices = self._slices(batch, dim, n, length, u.device)
        Ac = A.to(dtype)
        Dc = None if D is None else D.to(dtype)[:, None]
        dA = torch.zeros_like(Ac)
        dB = torch.zeros(B.shape, dtype=dtype, device=u.device)
        dC = torch.zeros(C.shape, dtype=dtype, device=u.device)
        du, ddelta = torch.empty_like(u, dtype=dtype), torch.empty_like(u, dtype=dtype)
        dz = None if z is None else torch.empty_like(u, dtype=dtype)
        dD = None if D is None else torch.zeros_like(Ac[:, 0])
        ddelta_bias = None if inputs.delta_bias is None else torch.zeros_like(Ac[:, 0])
        lam_next = u.new_zeros((batch, dim, n), dtype=dtype)  # λ at the first step after the slice
        lam_carries = u.new_empty((batch, dim, n, n_chunks), dtype=dtype)
        for c0, c1 in reversed(slices):
            t0, t1 = c0 * q, min(c1 * q, length)
            size, valid = (c1 - c0) * q, slice(0, t1 - t0)
            # Δ over [t0, t1 + 1): the step after the slice gives the decay a_{t+1} of the adjoint; zero-padded
            # steps have Δ = 0, i.e. the identity (a = 1, b = 0), and meet λ = 0
            dt_raw = prepare_delta(delta[:, :, t0 : t1 + 1], inputs.delta_bias, False, dtype)
            dt_ext = _slab(F.softplus(dt_raw) if delta_softplus else dt_raw, size + 1)
            dt, dt_next = dt_ext[:, :, :size], dt_ext[:, :, 1:]
            uc = _slab(u[:, :, t0:t1].to(dtype), size)
            dtu = dt * uc
            Bs, Cs = _slab_bc(B, t0, t1, size, dtype), _slab_bc(C, t0, t1, size, dtype)
            dout_s = _slab(dout[:, :, t0:t1].to(dtype), size)
            if z is None:
                dy = dout_s  # gradient w.r.t. y + D·u
            else:
                zc = _slab(z[:, :, t0:t1].to(dtype), size)
                sig_z = torch.sigmoid(zc)
                dy = dout_s * zc * sig_z
            # recompute h from the carries
            a_cum, h = self._local_scan(dt, Ac, dtu, Bs, q, False)
            h.addcmul_(a_cum, carries[:, :, c0:c1].transpose(2, 3)[..., None])
            del a_cum
            h = h.view(batch, dim, n, -1)
            if dz is not None:
                pre_gate = _sum_n(h, Cs) if Dc is None else _sum_n(h, Cs).addcmul_(uc, Dc)
                # silu'(z) = σ(z)(1 + z(1 − σ(z)))
                dz[:, :, t0:t1] = (dout_s * pre_gate * sig_z * (1 + zc * (1 - sig_z)))[:, :, valid]
            _add_bc_grad(dC, _sum_channels(h, dy, Cs), t0, t1)
            x = h.sub_(_times_bc(dtu, Bs))  # a_t·h_{t-1} = h_t − b_t
            del h
            # adjoint: λ_t = C_t·dy_t + a_{t+1}·λ_{t+1}, local reverse scan then carry from the end
            a_cum, lam = self._local_scan(dt_next, Ac, dy, Cs, q, True)
            for c in reversed(range(c1 - c0)):
                lam_carries[..., c0 + c] = lam_next
                lam_next = torch.addcmul(lam[:, :, :, c, 0], a_cum[:, :, :, c, 0], lam_next)
            lam.addcmul_(a_cum, lam_carries[..., c0:c1, None])
            del a_cum
            lam = lam.view(batch, dim, n, -1)
            lam_b = _sum_n(lam, Bs)  # Σ_n λ_t·B_t
            _add_bc_grad(dB, _sum_channels(lam, dtu, Bs), t0, t1)
            w = x.mul_(lam)  # λ_t·a_t·h_{t-1}
            del lam
            dA += torch.einsum("bdnt,bdt->dn", w, dt)
            ddt = torch.einsum("bdnt,dn->bdt", w, Ac).addcmul_(lam_b, uc)[:, :, valid]
            if delta_softplus:
                ddt = ddt * torch.sigmoid(dt_raw[:, :, valid])
            ddelta[:, :, t0:t1] = ddt
            du_s = lam_b * dt
            if Dc is not None and dD is not None:
                du_s.addcmul_(dy, Dc)
                dD += (dy * uc).sum((0, 2))
            du[:, :, t0:t1] = du_s[:, :, valid]
            if ddelta_bias is not None:
                ddelta_bias += ddt.sum((0, 2))
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


def run_chunked(inputs: ScanInputs, return_last_state: bool, chunk_size: int = 64) -> ScanOutput:
    """:func:`selective_scan_chunked` on inputs the caller has validated (the backend table's runner of ``"torch"``)."""
    return run_scan_kernel(ChunkedScanKernel(chunk_size), inputs, return_last_state)


def selective_scan_chunked(
    *args: Any, chunk_size: int = 64, return_last_state: bool = False, **kwargs: Any
) -> ScanOutput:
    """Chunked parallel selective scan in pure PyTorch with a hand-written backward (the ``"torch"`` backend).

    ``selective_scan(..., backend="torch")`` with a chosen chunk length: the same inputs, semantics and outputs as
    :func:`visionkit.ops.selective_scan`.

    Args:
        *args: ``u, delta, A, B, C, D, z, delta_bias, delta_softplus`` as :func:`visionkit.ops.selective_scan`
            takes them (positionally up to ``delta_softplus``, or by name).
        chunk_size: Chunk length Q along L (>= 1). Saved for backward: the inputs plus (batch, dim, L/Q, N) states.
        return_last_state: Also return the final state h_L, (batch, dim, N) (its gradient is ignored).
        **kwargs: The inputs given by name.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.

    Raises:
        ValueError: On a bad shape or ``chunk_size < 1``.
    """
    return run_chunked(ScanInputs(*args, **kwargs).validated(), return_last_state, chunk_size)
