"""The fused Triton kernels of the ``"triton"`` selective-scan backend (launched by :mod:`.triton_scan`).

One program per (batch, block of channels); it walks along L in chunks of ``BLOCK_L`` steps. Inside a chunk the
recurrence h_t = a_t·h_{t-1} + b_t is an inclusive ``tl.associative_scan`` of the pairs (a_t, b_t) under
(a0, b0)∘(a1, b1) = (a0·a1, a1·b0 + b1) on a (channels, states, steps) tile, and the state is carried from chunk to
chunk (``docs/ops/selective_scan.md``, "Numerics"). Everything around the scan is fused: delta bias and softplus,
exp(Δ·A), Δ·B·u, y = Σ_n C·h + D·u and the silu(z) gate. The forward saves the state at the end of every chunk
(batch, dim, n_chunks, N), like the CUDA kernel's ``x``; the backward walks the chunks from the end, recomputes the
states of a chunk from the saved one, runs the adjoint scan λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} in reverse, and forms
every gradient of ``docs/ops/selective_scan.md``, "Gradient", in the same pass (dB / dC of variable B / C by atomic
adds or per-program partial sums, the rest by per-program partial sums reduced afterwards). Accumulation is fp32
(fp64 for fp64 inputs).

The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; that is how CI tests them).
They were verified on an H100 (``bench/gpu_check.sh``); keep their arithmetic and the launch shapes of
:mod:`.triton_scan` unless that check runs again.
"""

from __future__ import annotations

try:  # triton is optional at import time (e.g. CPU-only wheels); the backend table reports why it is unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

__all__ = ["scan_bwd_kernel", "scan_fwd_kernel", "tl"]

if triton is not None:

    @triton.jit
    def _softplus(x):
        # torch.nn.functional.softplus with beta 1, threshold 20
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)

    @triton.jit
    def _combine(a0, b0, a1, b1):
        # (a0, b0) then (a1, b1): h -> a1·(a0·h + b0) + b1
        return a0 * a1, a1 * b0 + b1

    @triton.jit
    def scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,  # inputs
        out_ptr, states_ptr, last_ptr,  # out (batch, dim, L); states (batch, dim, n_chunks, N) at each chunk end; h_L
        dim, length, n_state, groups, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Forward scan of one (batch, channel block): out, the state at each chunk end and the last state."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        group = (pid_d * BLOCK_D) // (dim // groups)  # one group per program (BLOCK_D divides dim / groups)

        A = tl.load(a_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if not B_VAR:
            Bti = tl.load(b_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
        if not C_VAR:
            Cti = tl.load(c_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)

        row = (pid_b * dim + offs_d) * length  # (BLOCK_D,) start of each channel's sequence
        bc_row = (pid_b * groups + group) * n_state * length + offs_n * length  # (BLOCK_N,)
        state_row = (pid_b * dim + offs_d[:, None]) * n_chunks * n_state + offs_n[None, :]  # (BLOCK_D, BLOCK_N)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        for chunk in range(0, n_chunks):
            t = chunk * BLOCK_L + offs_l
            mask_l = t < length
            mask_dl = mask_d[:, None] & mask_l[None, :]
            idx = row[:, None] + t[None, :]
            u = tl.load(u_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            if HAS_BIAS:
                dt += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(mask_dl, dt, 0.0)  # Δ = 0 past the end: a = 1, b = 0 keep the state for the last-state output
            mask_nl = mask_n[:, None] & mask_l[None, :]
            if B_VAR:
                Bt = tl.load(b_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Bt = Bti[:, :, None]
            if C_VAR:
                Ct = tl.load(c_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Ct = Cti[:, :, None]
            a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L); masked steps: exp(0) = 1
            b = (dt * u)[:, None, :] * Bt  # masked steps: 0, so padded steps leave the state unchanged
            a_cum, b_cum = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
            hs = b_cum + a_cum * h[:, :, None]
            y = tl.sum(hs * Ct, axis=1)  # (BLOCK_D, BLOCK_L)
            h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
            tl.store(states_ptr + state_row + chunk * n_state, h, mask=mask_dn)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(z_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_ptr + idx, y, mask=mask_dl)
        tl.store(last_ptr + (pid_b * dim + offs_d[:, None]) * n_state + offs_n[None, :], h, mask=mask_dn)

    @triton.jit
    def scan_bwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr,  # inputs
        du_ptr, ddelta_ptr, dz_ptr,  # (batch, dim, L)
        sums_ptr,  # per-batch partial sums (batch, 3N + 2, dim): rows dA, time-invariant dB, dC (N each), dD, dbias
        dbvar_ptr, dcvar_ptr,  # BC_PARTIAL: (batch, dim / BLOCK_D, N, L) per-program sums; else (batch, G, N, L)
        dim, length, n_state, groups, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, BC_PARTIAL: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Backward scan of one (batch, channel block): du, ddelta, dz, and partial sums of the other gradients."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        group = (pid_d * BLOCK_D) // (dim // groups)

        dn_idx = offs_d[:, None] * n_state + offs_n[None, :]
        A = tl.load(a_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if not B_VAR:
            Bti = tl.load(b_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)
        if not C_VAR:
            Cti = tl.load(c_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)

        row = (pid_b * dim + offs_d) * length
        bc_row = (pid_b * groups + group) * n_state * length + offs_n * length
        state_row = (pid_b * dim + offs_d[:, None]) * n_chunks * n_state + offs_n[None, :]
        lam = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # λ at the first step of the chunk after the current one
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        for i in range(0, n_chunks):
            chunk = n_chunks - 1 - i
            t = chunk * BLOCK_L + offs_l
            mask_l = t < length
            mask_dl = mask_d[:, None] & mask_l[None, :]
            mask_nl = mask_n[:, None] & mask_l[None, :]
            idx = row[:, None] + t[None, :]
            u = tl.load(u_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            dt_raw = tl.load(delta_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            # Δ of the next step (t + 1), for the adjoint's decay a_{t+1}; 0 past the end gives a = 1 (λ_{L+1} = 0)
            mask_next = mask_d[:, None] & ((t + 1) < length)[None, :]
            dt_next = tl.load(delta_ptr + idx + 1, mask=mask_next, other=0.0).to(ACC)
            if HAS_BIAS:
                dt_raw += bias[:, None]
                dt_next += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                dt_next = _softplus(dt_next)
            else:
                dt = dt_raw
            dt = tl.where(mask_dl, dt, 0.0)
            if B_VAR:
                Bt = tl.load(b_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Bt = Bti[:, :, None]
            if C_VAR:
                Ct = tl.load(c_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Ct = Cti[:, :, None]

            # recompute the states of this chunk from the state saved at the end of the previous one
            if chunk > 0:
                h0 = tl.load(states_ptr + state_row + (chunk - 1) * n_state, mask=mask_dn, other=0.0).to(ACC)
            else:
                h0 = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
            a = tl.exp(dt[:, None, :] * A[:, :, None])
            bu = (dt * u)[:, None, :] * Bt
            a_cum, b_cum = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
            hs = b_cum + a_cum * h0[:, :, None]  # h_t
            ah = hs - bu  # a_t·h_{t-1}

            dout = tl.load(dout_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            if HAS_Z:
                zt = tl.load(z_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
                sig = tl.sigmoid(zt)
                y = tl.sum(hs * Ct, axis=1)
                if HAS_D:
                    y += Dv[:, None] * u
                tl.store(dz_ptr + idx, dout * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_dl)
                dy = dout * zt * sig
            else:
                dy = dout

            # adjoint: λ_t = C_t·dy_t + a_{t+1}·λ_{t+1}, scanned from the end of the chunk, then the carried λ
            a_next = tl.where(mask_next[:, None, :], tl.exp(dt_next[:, None, :] * A[:, :, None]), 0.0)
            g = Ct * dy[:, None, :]
            an_cum, lam_loc = tl.associative_scan((a_next, g), axis=2, combine_fn=_combine, reverse=True)
            lam_t = lam_loc + an_cum * lam[:, :, None]
            lam = tl.sum(tl.where(offs_l[None, None, :] == 0, lam_t, 0.0), axis=2)

            ddt = tl.sum(lam_t * (A[:, :, None] * ah + Bt * u[:, None, :]), axis=1)
            du = tl.sum(lam_t * Bt, axis=1) * dt
            if HAS_D:
                du += Dv[:, None] * dy
                dD_acc += tl.sum(tl.where(mask_dl, dy * u, 0.0), axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mask_dl, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=1)
            tl.store(du_ptr + idx, du, mask=mask_dl)
            tl.store(ddelta_ptr + idx, ddt, mask=mask_dl)

            dA_acc += tl.sum(lam_t * ah * dt[:, None, :], axis=2)
            db = lam_t * (dt * u)[:, None, :]  # ∂/∂B_t per channel
            dc = hs * dy[:, None, :]  # ∂/∂C_t per channel
            # variable dB / dC sum over the channels of a group: per-program partial sums (reduced afterwards), or
            # atomic adds when the partial buffer would be too large (atomics contend: every program of a group
            # adds to the same addresses)
            part_idx = ((pid_b * tl.num_programs(1) + pid_d) * n_state + offs_n) * length
            if B_VAR:
                if BC_PARTIAL:
                    tl.store(dbvar_ptr + part_idx[:, None] + t[None, :], tl.sum(db, axis=0), mask=mask_nl)
                else:
                    tl.atomic_add(dbvar_ptr + bc_row[:, None] + t[None, :], tl.sum(db, axis=0), mask=mask_nl)
            else:
                dB_acc += tl.sum(db, axis=2)
            if C_VAR:
                if BC_PARTIAL:
                    tl.store(dcvar_ptr + part_idx[:, None] + t[None, :], tl.sum(dc, axis=0), mask=mask_nl)
                else:
                    tl.atomic_add(dcvar_ptr + bc_row[:, None] + t[None, :], tl.sum(dc, axis=0), mask=mask_nl)
            else:
                dC_acc += tl.sum(dc, axis=2)

        sums_row = sums_ptr + pid_b * (3 * n_state + 2) * dim
        nd_idx = offs_n[None, :] * dim + offs_d[:, None]  # (BLOCK_D, BLOCK_N) → row n, column d
        tl.store(sums_row + nd_idx, dA_acc, mask=mask_dn)
        if not B_VAR:
            tl.store(sums_row + n_state * dim + nd_idx, dB_acc, mask=mask_dn)
        if not C_VAR:
            tl.store(sums_row + 2 * n_state * dim + nd_idx, dC_acc, mask=mask_dn)
        if HAS_D:
            tl.store(sums_row + 3 * n_state * dim + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(sums_row + (3 * n_state + 1) * dim + offs_d, dbias_acc, mask=mask_d)
