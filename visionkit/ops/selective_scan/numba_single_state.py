"""The single-state (N = 1, VMamba) kernels of the ``"numba"`` selective-scan backend.

Private to :mod:`visionkit.ops.selective_scan.numba_scan`, whose docstring describes the algorithm. With a single state
the recurrences are scalar chains h_t = a_t·h_{t-1} + b_t whose latency (one FMA per step) bounds a naive loop. These
kernels therefore walk :data:`LANES` channels at once: per chunk, the pointwise work of each channel runs as separate
loops over time that LLVM vectorises (each writes at most two arrays, so its runtime alias checks stay cheap), and
only the two recurrences (the state forwards, the adjoint backwards) interleave the :data:`LANES` independent chains
in locals.
"""

from __future__ import annotations

import numpy as np

from visionkit.ops.selective_scan import numba_support as nbs
from visionkit.ops.selective_scan.numba_support import jit, prange, sigmoid, step_sizes, vexp

#: Channels whose recurrences interleave: an FMA has a latency of 4 cycles and a throughput of 2 per cycle on current
#: x86 cores (Agner Fog's instruction tables), so 4 chains keep the FMA unit busy without spilling registers.
LANES = 4


@jit(inline=True)
def _load_bc(m: np.ndarray, bm: int, g: int, t0: int, n_steps: int, buf: np.ndarray) -> None:
    """buf[:n_steps] = B or C (batch or 1, G, L or 1) of N = 1 at steps t0 … t0+n_steps-1 (L = 1: repeated)."""
    if m.shape[2] > 1:
        src = m[bm, g, t0 : t0 + n_steps]
        for i in range(n_steps):
            buf[i] = src[i]
    else:
        v = m[bm, g, 0]
        for i in range(n_steps):
            buf[i] = v


@jit(inline=True)
def _prepare_lane(
    ins: nbs.ScanArrays,
    b: int,
    d: int,
    span: tuple[int, int],
    softplus_on: bool,
    need_grad: bool,
    bv: np.ndarray,
    rows: tuple[np.ndarray, ...],
) -> None:
    """Pointwise part of one chunk (steps ``span`` = (t0, n_steps)) of channel (b, d) with N = 1.

    Writes ``rows`` = (dt, dsp, a, bu), each (chunk,): dt = Δ_t, dsp = dΔ_t / d delta_t (only with ``need_grad``),
    a = exp(Δ_t·A), bu = Δ_t·u_t·B_t (B_t in ``bv``).
    """
    u, delta, A, bias = ins.u, ins.delta, ins.A, ins.delta_bias
    dt, dsp, a, bu = rows
    t0, n_steps = span
    bd, a0 = bias[d], A[d, 0]
    x_row, u_row = delta[b, d, t0 : t0 + n_steps], u[b, d, t0 : t0 + n_steps]  # row views: indices i >= 0
    step_sizes(x_row, bd, n_steps, (softplus_on, need_grad), dt, dsp)
    for i in range(n_steps):
        a[i] = vexp(dt[i] * a0)
        bu[i] = dt[i] * u_row[i] * bv[i]


@jit(inline=True)
def _scan_lanes(a: np.ndarray, bu: np.ndarray, hc: np.ndarray, n_steps: int, hs: np.ndarray, off: int) -> None:
    """h_i = a_i·h_{i-1} + bu_i for the :data:`LANES` rows of ``a`` / ``bu`` (LANES, chunk) from h_{-1} = ``hc``.

    Writes hs[l, i + off] = h_i and leaves the last state in ``hc``; with off = 1 also hs[l, 0] = h_{-1}.
    """
    h0, h1, h2, h3 = hc[0], hc[1], hc[2], hc[3]
    if off:
        hs[0, 0], hs[1, 0], hs[2, 0], hs[3, 0] = h0, h1, h2, h3
    for i in range(n_steps):
        h0 = a[0, i] * h0 + bu[0, i]
        h1 = a[1, i] * h1 + bu[1, i]
        h2 = a[2, i] * h2 + bu[2, i]
        h3 = a[3, i] * h3 + bu[3, i]
        hs[0, i + off], hs[1, i + off], hs[2, i + off], hs[3, i + off] = h0, h1, h2, h3
    hc[0], hc[1], hc[2], hc[3] = h0, h1, h2, h3


@jit(inline=True)
def _adjoint_lanes(a: np.ndarray, g: np.ndarray, carry: np.ndarray, n_steps: int, lam: np.ndarray) -> None:
    """λ_i = g_i + a_{i+1}·λ_{i+1} backwards over the chunk, for the :data:`LANES` rows; n_steps >= 1.

    ``carry`` holds a·λ of the step after the chunk on entry and a_0·λ_0 on return.
    """
    j = n_steps - 1
    l0, l1, l2, l3 = g[0, j] + carry[0], g[1, j] + carry[1], g[2, j] + carry[2], g[3, j] + carry[3]
    lam[0, j], lam[1, j], lam[2, j], lam[3, j] = l0, l1, l2, l3
    for k in range(1, n_steps):
        i = j - k
        l0 = a[0, i + 1] * l0 + g[0, i]
        l1 = a[1, i + 1] * l1 + g[1, i]
        l2 = a[2, i + 1] * l2 + g[2, i]
        l3 = a[3, i + 1] * l3 + g[3, i]
        lam[0, i], lam[1, i], lam[2, i], lam[3, i] = l0, l1, l2, l3
    carry[0], carry[1], carry[2], carry[3] = a[0, 0] * l0, a[1, 0] * l1, a[2, 0] * l2, a[3, 0] * l3


@jit(parallel=True)
def forward_kernel_n1(
    ins: nbs.ScanArrays, cfg: nbs.KernelConfig, outs: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """Forward scan for N = 1, one task per (batch element, ``block`` channels).

    ``ins`` as for the general kernel but with the N axis dropped: A (dim, 1), B / C (batch or 1, G, L or 1).
    Writes ``outs`` = (out (batch, dim, L), states (batch, dim, n_chunks), last (batch, dim)).
    """
    u, Bm, Cm, D, z = ins.u, ins.B, ins.C, ins.D, ins.z
    softplus_on, has_z, chunk, block = cfg.softplus, cfg.has_z, cfg.chunk, cfg.block
    out, states, last = outs
    batch, dim, length = u.shape
    n_chunks = states.shape[2]
    one = u.dtype.type(1.0)
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    n_blocks = -(-dim // block)
    for job in prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        bb, bc = b if Bm.shape[0] > 1 else 0, b if Cm.shape[0] > 1 else 0
        dt = np.empty((LANES, chunk), dtype=u.dtype)
        a, bu, hs, bv, cv = (
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
        )
        hc = np.zeros(LANES, dtype=u.dtype)
        end = min((k + 1) * block, dim)
        for d0 in range(k * block, end, LANES):
            n_lanes = min(LANES, end - d0)
            hc[:] = 0
            for c in range(n_chunks):
                t0 = c * chunk
                n_steps = min(chunk, length - t0)
                for lane in range(LANES):
                    if lane < n_lanes:
                        d = d0 + lane
                        states[b, d, c] = hc[lane]
                        _load_bc(Bm, bb, d // cpg_b, t0, n_steps, bv[lane])
                        rows = (dt[lane], dt[lane], a[lane], bu[lane])
                        _prepare_lane(ins, b, d, (t0, n_steps), softplus_on, False, bv[lane], rows)
                    else:  # idle lane of a short group: keep its chain at zero
                        a[lane, :] = 0
                        bu[lane, :] = 0
                _scan_lanes(a, bu, hc, n_steps, hs, 0)
                for lane in range(n_lanes):
                    d = d0 + lane
                    _load_bc(Cm, bc, d // cpg_c, t0, n_steps, cv[lane])
                    dd, h_row, c_row = D[d], hs[lane], cv[lane]
                    o_row, u_row = out[b, d, t0 : t0 + n_steps], u[b, d, t0 : t0 + n_steps]
                    if has_z:
                        z_row = z[b, d, t0 : t0 + n_steps]
                        for i in range(n_steps):
                            o_row[i] = (h_row[i] * c_row[i] + dd * u_row[i]) * z_row[i] * sigmoid(z_row[i], one)
                    else:
                        for i in range(n_steps):
                            o_row[i] = h_row[i] * c_row[i] + dd * u_row[i]
            for lane in range(n_lanes):
                last[b, d0 + lane] = hc[lane]


@jit(inline=True)
def _dy_lane(
    ins: nbs.ScanArrays,
    b: int,
    d: int,
    span: tuple[int, int],
    has_z: bool,
    dout: np.ndarray,
    dz: np.ndarray,
    rows: tuple[np.ndarray, ...],
) -> None:
    """The gradient dy at y + D·u and g = C·dy for one lane; with a gate also dz.

    Formulas: ``docs/ops/selective_scan.md``, "Gradient".

    ``rows`` = (hs (chunk + 1,) with hs[i + 1] = h_{t0+i}, cv = C_t, dy, g), the last two written.
    """
    u, D, z = ins.u, ins.D, ins.z
    hs, cv, dy, g = rows
    t0, n_steps = span
    one = u.dtype.type(1.0)
    go_row = dout[b, d, t0 : t0 + n_steps]
    if has_z:
        dd = D[d]
        u_row, z_row, dz_row = u[b, d, t0 : t0 + n_steps], z[b, d, t0 : t0 + n_steps], dz[b, d, t0 : t0 + n_steps]
        for i in range(n_steps):
            zz = z_row[i]
            sig = sigmoid(zz, one)
            dz_row[i] = go_row[i] * (cv[i] * hs[i + 1] + dd * u_row[i]) * (sig * (one + zz * (one - sig)))
        for i in range(n_steps):
            zz = z_row[i]
            dy_t = go_row[i] * (zz * sigmoid(zz, one))
            dy[i] = dy_t
            g[i] = cv[i] * dy_t
    else:
        for i in range(n_steps):
            dy[i] = go_row[i]
            g[i] = cv[i] * go_row[i]


@jit(inline=True)
def _grads_lane(
    ins: nbs.ScanArrays,
    b: int,
    d: int,
    span: tuple[int, int],
    rows: tuple[np.ndarray, ...],
    slots: tuple[int, int],
    grads: nbs.GradArrays,
) -> tuple[float, float, float, float, float]:
    """Gradients of one chunk of one lane from its adjoint; each loop writes one array so that LLVM vectorises it.

    ``rows`` = (dt, dsp, a, hs, bv, dy, lam); ``slots`` = (slot_b, slot_c). Writes du and ddelta, adds into a
    variable B / C's slot, and returns this chunk's sums (dA, ddelta_bias, dD, dB, dC), the last two only for a
    time-invariant B / C (L or 1 = 1).
    """
    u, A, D = ins.u, ins.A, ins.D
    dt, dsp, a, hs, bv, dy, lam = rows
    t0, n_steps = span
    slot_b, slot_c = slots
    du, ddelta, dB_part, dC_part = grads.du, grads.ddelta, grads.dB, grads.dC
    zero = u.dtype.type(0.0)
    dd, a0 = D[d], A[d, 0]
    u_row, du_row, ddelta_row = u[b, d, t0 : t0 + n_steps], du[b, d, t0 : t0 + n_steps], ddelta[b, d, t0 : t0 + n_steps]
    for i in range(n_steps):
        du_row[i] = lam[i] * dt[i] * bv[i] + dy[i] * dd
    s_a = s_bias = s_d = s_b = s_c = zero
    for i in range(n_steps):
        da = lam[i] * hs[i] * a[i]  # ∂loss/∂a_t · a_t
        ddt = (da * a0 + lam[i] * bv[i] * u_row[i]) * dsp[i]
        ddelta_row[i] = ddt
        s_a += da * dt[i]
        s_bias += ddt
        s_d += dy[i] * u_row[i]
    if dB_part.shape[2] > 1:
        db_row = dB_part[b, slot_b, t0 : t0 + n_steps]
        for i in range(n_steps):
            db_row[i] += lam[i] * dt[i] * u_row[i]
    else:
        for i in range(n_steps):
            s_b += lam[i] * dt[i] * u_row[i]
    if dC_part.shape[2] > 1:
        dc_row = dC_part[b, slot_c, t0 : t0 + n_steps]
        for i in range(n_steps):
            dc_row[i] += dy[i] * hs[i + 1]
    else:
        for i in range(n_steps):
            s_c += dy[i] * hs[i + 1]
    return s_a, s_bias, s_d, s_b, s_c


@jit(parallel=True)
def backward_kernel_n1(
    ins: nbs.ScanArrays, cfg: nbs.KernelConfig, states: np.ndarray, dout: np.ndarray, grads: nbs.GradArrays
) -> None:
    """Backward scan for N = 1; tasks and outputs as the general backward kernel, with the N axis dropped.

    ``ins`` and ``states`` as :func:`forward_kernel_n1` takes / writes them; ``grads`` with dA (batch, dim) and
    dB / dC (batch, slots, L or 1). Per task, the channels go in groups of :data:`LANES`; per group the chunks are
    visited last to first.
    """
    u, Bm, Cm = ins.u, ins.B, ins.C
    softplus_on, has_z, chunk = cfg.softplus, cfg.has_z, cfg.chunk
    block, slot_div_b, slot_div_c = cfg.block, cfg.slot_div_b, cfg.slot_div_c
    dz, dA_part, dD_part = grads.dz, grads.dA, grads.dD
    dB_part, dC_part, dbias_part = grads.dB, grads.dC, grads.ddelta_bias
    batch, dim, length = u.shape
    n_chunks = states.shape[2]
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    n_blocks = dim // block
    for job in prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        bb, bc = b if Bm.shape[0] > 1 else 0, b if Cm.shape[0] > 1 else 0
        dt = np.empty((LANES, chunk), dtype=u.dtype)
        dsp, a, bu, bv, cv = (
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
            np.empty_like(dt),
        )
        dy, g, lam = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        hs = np.empty((LANES, chunk + 1), dtype=u.dtype)  # hs[l, i] = h_{t0+i-1}
        hc, carry = np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype)
        sums = np.zeros((5, LANES), dtype=u.dtype)  # dA, ddelta_bias, dD, time-invariant dB, dC per lane
        end = (k + 1) * block
        for d0 in range(k * block, end, LANES):
            n_lanes = min(LANES, end - d0)
            carry[:] = 0
            sums[:] = 0
            for c in range(n_chunks - 1, -1, -1):
                span = (c * chunk, min(chunk, length - c * chunk))
                n_steps = span[1]
                for lane in range(LANES):
                    if lane < n_lanes:
                        d = d0 + lane
                        hc[lane] = states[b, d, c]
                        _load_bc(Bm, bb, d // cpg_b, span[0], n_steps, bv[lane])
                        _load_bc(Cm, bc, d // cpg_c, span[0], n_steps, cv[lane])
                        rows = (dt[lane], dsp[lane], a[lane], bu[lane])
                        _prepare_lane(ins, b, d, span, softplus_on, True, bv[lane], rows)
                    else:  # idle lane of a short group: keep its chains at zero
                        hc[lane] = 0
                        a[lane, :] = 0
                        bu[lane, :] = 0
                        g[lane, :] = 0
                _scan_lanes(a, bu, hc, n_steps, hs, 1)
                for lane in range(n_lanes):
                    rows = (hs[lane], cv[lane], dy[lane], g[lane])
                    _dy_lane(ins, b, d0 + lane, span, has_z, dout, dz, rows)
                _adjoint_lanes(a, g, carry, n_steps, lam)
                for lane in range(n_lanes):
                    d = d0 + lane
                    rows = (dt[lane], dsp[lane], a[lane], hs[lane], bv[lane], dy[lane], lam[lane])
                    part = _grads_lane(ins, b, d, span, rows, (d // slot_div_b, d // slot_div_c), grads)
                    for j in range(5):
                        sums[j, lane] += part[j]
            for lane in range(n_lanes):
                d = d0 + lane
                dA_part[b, d] = sums[0, lane]
                dbias_part[b, d] = sums[1, lane]
                dD_part[b, d] = sums[2, lane]
                if dB_part.shape[2] == 1:  # time-invariant (or L = 1): zeroed slots, shared within a block
                    dB_part[b, d // slot_div_b, 0] += sums[3, lane]
                if dC_part.shape[2] == 1:
                    dC_part[b, d // slot_div_c, 0] += sums[4, lane]
