"""The kernels for N > 1 states of the ``"numba"`` selective-scan backend.

Private to :mod:`visionkit.ops.selective_scan.numba_scan`, whose docstring describes the algorithm. Here the vector
axis is the state: each step's N states (16 float32 with Mamba's d_state, one AVX-512 register) form a contiguous row
of a per-task (chunk, N) scratch array. Each phase of a chunk is its own loop over time whose inner loop over the row
writes one array, so that LLVM vectorises it after a cheap runtime alias check: the exponentials, the states
h_t = a_t·h_{t-1} + Δ_t·u_t·B_t (forwards), the adjoint λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} (backwards) and the
gradients. B and C of one group are shared by all its channels, so a backward task adds every channel's dB / dC
rows into its own slot of the partial buffers.
"""

from __future__ import annotations

import numpy as np

from visionkit.ops.selective_scan import numba_support as nbs
from visionkit.ops.selective_scan.numba_support import jit, prange, sigmoid, step_sizes, vexp


@jit(inline=True)
def _fill_rows(m: np.ndarray, bm: int, g: int, buf: np.ndarray) -> None:
    """Every row of ``buf`` (chunk, N) = row 0 of B or C (batch or 1, G, 1, N), when that has one time step."""
    if m.shape[2] == 1:
        src = m[bm, g, 0]
        for i in range(buf.shape[0]):
            dst = buf[i]
            for k in range(src.shape[0]):
                dst[k] = src[k]


@jit(inline=True)
def _rows(m: np.ndarray, bm: int, g: int, span: tuple[int, int], buf: np.ndarray) -> np.ndarray:
    """Rows t0 … t0+n_steps-1 of B or C (batch or 1, G, L or 1, N): a view, or ``buf`` from :func:`_fill_rows`."""
    t0, n_steps = span
    if m.shape[2] > 1:
        return m[bm, g, t0 : t0 + n_steps]
    return buf[:n_steps]


@jit(inline=True)
def _prepare(
    ins: nbs.ScanArrays,
    b: int,
    d: int,
    span: tuple[int, int],
    flags: tuple[bool, bool, bool],
    rows: tuple[np.ndarray, ...],
) -> None:
    """Pointwise part of one chunk (steps ``span`` = (t0, n_steps)) of channel (b, d).

    ``flags`` = (softplus, has_z, need_grad). Writes ``rows`` = (dt, dsp, dtu, gate, dgate), each (chunk,): dt = Δ_t,
    dsp = dΔ_t / d delta_t, dtu = Δ_t·u_t, gate = silu(z_t), dgate = silu'(z_t); dsp and dgate only with need_grad.
    """
    u, delta, z, bias = ins.u, ins.delta, ins.z, ins.delta_bias
    softplus_on, has_z, need_grad = flags
    dt, dsp, dtu, gate, dgate = rows
    t0, n_steps = span
    one = u.dtype.type(1.0)
    bd = bias[d]
    x_row, u_row = delta[b, d, t0 : t0 + n_steps], u[b, d, t0 : t0 + n_steps]
    step_sizes(x_row, bd, n_steps, (softplus_on, need_grad), dt, dsp)
    for i in range(n_steps):
        dtu[i] = dt[i] * u_row[i]
    if has_z:
        z_row = z[b, d, t0 : t0 + n_steps]
        for i in range(n_steps):
            gate[i] = z_row[i] * sigmoid(z_row[i], one)
        if need_grad:
            for i in range(n_steps):
                sig = sigmoid(z_row[i], one)
                dgate[i] = sig * (one + z_row[i] * (one - sig))  # silu'(z) (docs/ops/selective_scan.md, "Gradient")


@jit(inline=True)
def _scan_outputs(a_row: np.ndarray, rows: tuple[np.ndarray, ...], n_steps: int, h: np.ndarray, y: np.ndarray) -> None:
    """H ← exp(Δ_i·A)·h + Δ_i·u_i·B_i and y[i] = C_i·h for i < n_steps, with ``rows`` = (dt, dtu, B rows, C rows)."""
    dt, dtu, bv, cv = rows
    n_state = h.shape[0]
    zero = h.dtype.type(0.0)
    for i in range(n_steps):
        b_i, c_i, dt_i, x = bv[i], cv[i], dt[i], dtu[i]
        acc = zero
        for k in range(n_state):
            h_k = vexp(dt_i * a_row[k]) * h[k] + x * b_i[k]
            h[k] = h_k
            acc += c_i[k] * h_k
        y[i] = acc


@jit(parallel=True)
def forward_kernel(
    ins: nbs.ScanArrays, cfg: nbs.KernelConfig, out: np.ndarray, states: np.ndarray, last: np.ndarray
) -> None:
    """Forward scan; writes ``out`` (batch, dim, L), ``states`` (batch, dim, n_chunks, N) and ``last`` (batch, dim, N).

    ``ins``: the inputs in one float dtype (:class:`~visionkit.ops.selective_scan.numba_support.ScanArrays`: B / C
    (batch or 1, G, L or 1, N), a size-1 batch or time axis broadcast).
    """
    u, A, Bm, Cm, D = ins.u, ins.A, ins.B, ins.C, ins.D
    softplus_on, has_z, chunk = cfg.softplus, cfg.has_z, cfg.chunk
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = states.shape[2]
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    for job in prange(batch * dim):
        b, d = job // dim, job % dim
        bb, gb, bc, gc = b if Bm.shape[0] > 1 else 0, d // cpg_b, b if Cm.shape[0] > 1 else 0, d // cpg_c
        b_buf, c_buf = np.empty((chunk, n_state), dtype=u.dtype), np.empty((chunk, n_state), dtype=u.dtype)
        _fill_rows(Bm, bb, gb, b_buf)
        _fill_rows(Cm, bc, gc, c_buf)
        h = np.zeros(n_state, dtype=u.dtype)
        dt = np.empty(chunk, dtype=u.dtype)
        dtu, gate, y = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        dd = D[d]
        for c in range(n_chunks):
            span = (c * chunk, min(chunk, length - c * chunk))
            t0, n_steps = span
            states[b, d, c, :] = h
            _prepare(ins, b, d, span, (softplus_on, has_z, False), (dt, dt, dtu, gate, gate))
            rows = (dt, dtu, _rows(Bm, bb, gb, span, b_buf), _rows(Cm, bc, gc, span, c_buf))
            _scan_outputs(A[d], rows, n_steps, h, y)
            u_row, o_row = u[b, d, t0 : t0 + n_steps], out[b, d, t0 : t0 + n_steps]
            if has_z:
                for i in range(n_steps):
                    o_row[i] = (y[i] + dd * u_row[i]) * gate[i]
            else:
                for i in range(n_steps):
                    o_row[i] = y[i] + dd * u_row[i]
        last[b, d, :] = h


@jit(inline=True)
def _scan_states(a_row: np.ndarray, rows: tuple[np.ndarray, ...], n_steps: int, a: np.ndarray, hs: np.ndarray) -> None:
    """a[i] = exp(Δ_i·A) and hs[i + 1] = a[i]·hs[i] + Δ_i·u_i·B_i for i < n_steps, from the start state in hs[0].

    ``rows`` = (dt, dtu, B rows); rows of N states.
    """
    dt, dtu, bv = rows
    n_state = hs.shape[1]
    for i in range(n_steps):
        h_prev, h_next, a_i, b_i, dt_i, x = hs[i], hs[i + 1], a[i], bv[i], dt[i], dtu[i]
        for k in range(n_state):
            e = vexp(dt_i * a_row[k])
            a_i[k] = e
            h_next[k] = e * h_prev[k] + x * b_i[k]


@jit(inline=True)
def _row_dots(m: np.ndarray, hs: np.ndarray, n_steps: int, out: np.ndarray) -> None:
    """out[i] = m[i]·hs[i + 1] (y_t = C_t·h_t) for i < n_steps."""
    n_state = hs.shape[1]
    zero = hs.dtype.type(0.0)
    for i in range(n_steps):
        m_i, h_i = m[i], hs[i + 1]
        acc = zero
        for k in range(n_state):
            acc += m_i[k] * h_i[k]
        out[i] = acc


@jit(inline=True)
def _adjoint(rows: tuple[np.ndarray, ...], n_steps: int, lam: np.ndarray) -> None:
    """λ_i = C_i·dy_i + a_{i+1}·λ_{i+1} backwards over a chunk of n_steps rows, into ``lam``.

    ``rows`` = (a, C rows, dy); ``a`` and ``lam`` (chunk + 1, N) hold a = 1 and a·λ of the step after the chunk in
    row n_steps on entry.
    """
    a, cv, dy = rows
    n_state = lam.shape[1]
    for i in range(n_steps - 1, -1, -1):
        lam_i, lam_n, a_n, c_i, g = lam[i], lam[i + 1], a[i + 1], cv[i], dy[i]
        for k in range(n_state):
            lam_i[k] = c_i[k] * g + a_n[k] * lam_n[k]


@jit(inline=True)
def _state_grads(
    a_row: np.ndarray,
    rows: tuple[np.ndarray, ...],
    n_steps: int,
    sums: tuple[np.ndarray, np.ndarray],
    dA_acc: np.ndarray,
) -> None:
    """The sums over the states of one chunk, from the adjoint.

    ``rows`` = (lam, hs, a, B rows, dt) with hs[i] = h_{t-1}. Writes ``sums`` = (s_b, s_a) with s_b[i] = λ_i·B_i and
    s_a[i] = Σ_n A_n·(∂loss/∂a_i)_n·a_i,n, and adds Σ_i (∂loss/∂a_i)·a_i·Δ_i into dA_acc (N,).
    """
    lam, hs, a, bv, dt = rows
    s_b, s_a = sums
    n_state = lam.shape[1]
    zero = lam.dtype.type(0.0)
    for i in range(n_steps):
        lam_i, h_i, a_i, b_i, dt_i = lam[i], hs[i], a[i], bv[i], dt[i]
        acc_b = acc_a = zero
        for k in range(n_state):
            da = lam_i[k] * h_i[k] * a_i[k]  # ∂loss/∂a_t · a_t
            acc_a += da * a_row[k]
            acc_b += lam_i[k] * b_i[k]
            dA_acc[k] += da * dt_i
        s_b[i] = acc_b
        s_a[i] = acc_a


@jit(inline=True)
def _accumulate_rows(m: np.ndarray, x: np.ndarray, off: int, n_steps: int, dst: np.ndarray) -> None:
    """dst[i] += x[i]·m[i + off] for i < n_steps, or into dst[0] when dst has one row (a time-invariant B / C)."""
    n_state = m.shape[1]
    if dst.shape[0] > 1:
        for i in range(n_steps):
            m_i, d_i, x_i = m[i + off], dst[i], x[i]
            for k in range(n_state):
                d_i[k] += x_i * m_i[k]
    else:
        d_0 = dst[0]
        for i in range(n_steps):
            m_i, x_i = m[i + off], x[i]
            for k in range(n_state):
                d_0[k] += x_i * m_i[k]


@jit(parallel=True)
def backward_kernel(
    ins: nbs.ScanArrays, cfg: nbs.KernelConfig, states: np.ndarray, dout: np.ndarray, grads: nbs.GradArrays
) -> None:
    """Backward scan, one task per (batch element, block of ``block`` channels).

    ``ins`` as in :func:`forward_kernel`. Writes ``grads``: du, ddelta, dz (batch, dim, L) and partial sums that the
    caller reduces: dA (batch, dim, N), dB / dC (batch, slots, L or 1, N), zeroed, with slot d // slot_div
    (``cfg``: slot_div = block for a variable B / C, one slot per block; 1 for a time-invariant one), dD and
    ddelta_bias (batch, dim).
    """
    u, A, Bm, Cm, D = ins.u, ins.A, ins.B, ins.C, ins.D
    softplus_on, has_z, chunk = cfg.softplus, cfg.has_z, cfg.chunk
    block, slot_div_b, slot_div_c = cfg.block, cfg.slot_div_b, cfg.slot_div_c
    du, ddelta, dz, dA_part, dD_part = grads.du, grads.ddelta, grads.dz, grads.dA, grads.dD
    dB_part, dC_part, dbias_part = grads.dB, grads.dC, grads.ddelta_bias
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = states.shape[2]
    zero, one = u.dtype.type(0.0), u.dtype.type(1.0)
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    n_blocks = dim // block
    for job in prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        bb, bc = b if Bm.shape[0] > 1 else 0, b if Cm.shape[0] > 1 else 0
        hs = np.empty((chunk + 1, n_state), dtype=u.dtype)  # hs[i] = h_{t0+i-1}
        a, lam = np.empty_like(hs), np.empty_like(hs)
        b_buf, c_buf = np.empty((chunk, n_state), dtype=u.dtype), np.empty((chunk, n_state), dtype=u.dtype)
        dt = np.empty(chunk, dtype=u.dtype)
        dsp, dtu, gate, dgate = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        dy, s_b, s_a = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        dA_acc = np.empty(n_state, dtype=u.dtype)
        for d in range(k * block, (k + 1) * block):
            gb, gc = d // cpg_b, d // cpg_c
            _fill_rows(Bm, bb, gb, b_buf)
            _fill_rows(Cm, bc, gc, c_buf)
            dd = D[d]
            db_slot, dc_slot = dB_part[b, d // slot_div_b], dC_part[b, d // slot_div_c]
            lam[min(chunk, length - (n_chunks - 1) * chunk), :] = zero  # nothing after the last step
            dA_acc[:] = zero
            dD_acc = dbias_acc = zero
            for c in range(n_chunks - 1, -1, -1):
                span = (c * chunk, min(chunk, length - c * chunk))
                t0, n_steps = span
                _prepare(ins, b, d, span, (softplus_on, has_z, True), (dt, dsp, dtu, gate, dgate))
                bv, cv = _rows(Bm, bb, gb, span, b_buf), _rows(Cm, bc, gc, span, c_buf)
                hs[0, :] = states[b, d, c]
                _scan_states(A[d], (dt, dtu, bv), n_steps, a, hs)
                u_row, go_row = u[b, d, t0 : t0 + n_steps], dout[b, d, t0 : t0 + n_steps]
                if has_z:  # out = (y + D·u)·silu(z): dz needs y_t = C_t·h_t
                    _row_dots(cv, hs, n_steps, dy)
                    dz_row = dz[b, d, t0 : t0 + n_steps]
                    for i in range(n_steps):
                        dz_row[i] = go_row[i] * (dy[i] + dd * u_row[i]) * dgate[i]
                    for i in range(n_steps):
                        dy[i] = go_row[i] * gate[i]
                else:
                    for i in range(n_steps):
                        dy[i] = go_row[i]
                a[n_steps, :] = one
                _adjoint((a, cv, dy), n_steps, lam)
                _state_grads(A[d], (lam, hs, a, bv, dt), n_steps, (s_b, s_a), dA_acc)
                du_row, ddelta_row = du[b, d, t0 : t0 + n_steps], ddelta[b, d, t0 : t0 + n_steps]
                for i in range(n_steps):
                    du_row[i] = dy[i] * dd + dt[i] * s_b[i]
                for i in range(n_steps):
                    ddt = (s_a[i] + u_row[i] * s_b[i]) * dsp[i]
                    ddelta_row[i] = ddt
                    dbias_acc += ddt
                    dD_acc += dy[i] * u_row[i]
                ts_b, ts_c = t0 if db_slot.shape[0] > 1 else 0, t0 if dc_slot.shape[0] > 1 else 0
                _accumulate_rows(lam, dtu, 0, n_steps, db_slot[ts_b : ts_b + n_steps])
                _accumulate_rows(hs, dy, 1, n_steps, dc_slot[ts_c : ts_c + n_steps])
                for j in range(n_state):  # a·λ at the chunk's first step, carried into the previous chunk
                    lam[chunk, j] = a[0, j] * lam[0, j]
            dA_part[b, d, :] = dA_acc
            dD_part[b, d] = dD_acc
            dbias_part[b, d] = dbias_acc
