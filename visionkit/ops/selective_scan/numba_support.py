"""What the ``"numba"`` selective-scan kernels share: their argument records, compile options and float32 math.

Private to :mod:`visionkit.ops.selective_scan`. The kernels take their arrays and settings as the named tuples below
(numba compiles a field access into a plain load) and read every field by name. exp and log1p are written out for
float32 (range reduction plus polynomial) because numba's calls into libm are not vectorised; float64 (used by
gradcheck) calls ``math.exp`` / ``math.log1p``.

numba's on-disk cache does not track imports: a kernel compiled from one file keeps the helpers it inlined from
another, so after editing this file also touch the kernel modules (or delete
``visionkit/ops/selective_scan/__pycache__``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

try:
    import numba
    from numba import types
    from numba.extending import overload

    NUMBA_ERROR: str | None = None
except Exception as exc:  # missing or broken numba: importing this module must still work
    numba = None
    NUMBA_ERROR = f"{type(exc).__name__}: {exc}"


class ScanArrays(NamedTuple):
    """The scan's inputs as numpy arrays in one float dtype (a kernel's ``ins``).

    Each field holds the input of the same name of :class:`~visionkit.ops.selective_scan.inputs.ScanInputs`; an
    absent D or delta_bias is zeros (dim,), an absent z is empty (0, 0, 0). B / C are (batch or 1, G, L or 1, N), a
    size-1 batch or time axis broadcast (time-invariant B / C: (1, dim, 1, N), one group per channel); the N = 1
    kernels get them without the N axis.
    """

    u: np.ndarray
    delta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray
    z: np.ndarray
    delta_bias: np.ndarray


class KernelConfig(NamedTuple):
    """Run-time settings of a kernel call, and how it splits the channels into tasks."""

    softplus: bool
    """Δ = softplus(delta + delta_bias) instead of delta + delta_bias."""
    has_z: bool
    """The output is gated by silu(z)."""
    chunk: int
    """Steps per chunk: one saved state per chunk."""
    block: int
    """Channels per task of the N = 1 kernels and of the backward kernels (inside one group of every variable B / C
    in the backward)."""
    slot_div_b: int
    """Backward: channel d adds its dB into slot d // slot_div_b of the partial buffer (block if B is variable, else
    1)."""
    slot_div_c: int
    """Backward: the same for dC."""


class GradArrays(NamedTuple):
    """The outputs of a backward kernel, (batch, ...) partial sums that the caller reduces.

    du, ddelta, dz (batch, dim, L) (dz empty without z); dA (batch, dim, N); dB / dC (batch, slots, L or 1, N),
    zeroed; dD, ddelta_bias (batch, dim). The N = 1 kernels get dA, dB and dC without the N axis.
    """

    du: np.ndarray
    ddelta: np.ndarray
    dz: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dC: np.ndarray
    dD: np.ndarray
    ddelta_bias: np.ndarray


# fastmath without nnan / ninf, so that NaN and Inf still propagate like in the reference
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# float32 exp: Cody-Waite split of ln 2 and the degree-5 minimax polynomial of Cephes' expf (cephes/single/expf.c)
_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_EXP_P = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1))
_EXP_P5 = _F(5.0000001201e-1)
_HALF, _ONE, _TWO = _F(0.5), _F(1.0), _F(2.0)
_EXP_LO = _F(-87.33654)  # ln(FLT_MIN): below it the result is ~1e-38 instead of a denormal
_EXP_HI = _F(88.72283)  # ln(FLT_MAX): above it the result is +inf
_INF = _F(np.inf)
# log1p(e) = 2·atanh(s), s = e / (2 + e) ∈ [0, 1/3] for e ∈ [0, 1]: odd series 2·Σ s^(2k+1) / (2k+1), 8 terms
# (truncation (1/9)^8 / 17 < 2e-9 relative)
_LOG1P_Q = tuple(_F(1.0 / (2 * k + 1)) for k in range(8))
# torch.nn.functional.softplus: beta 1, threshold 20 (x > 20 returns x)
_SOFTPLUS_THRESHOLD = 20.0


def _exp_f32(x: float) -> float:
    """exp(x) in float32 with only arithmetic and a bit cast, so loops calling it vectorise (max rel. error ~2e-7)."""
    xc = x if x > _EXP_LO else _EXP_LO
    xc = xc if xc < _EXP_HI else _EXP_HI
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p0, p1, p2, p3, p4 = _EXP_P
    p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + _EXP_P5
    y = p * (r * r) + r + _ONE
    scale = np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)
    y = y * scale
    y = _INF if x > _EXP_HI else y
    return x if x != x else y  # NaN in, NaN out


def _log1p_unit_f32(e: float) -> float:
    """log1p(e) for e in [0, 1] in float32, arithmetic only (relative error ~1e-7, exact near 0)."""
    s = e / (_TWO + e)
    s2 = s * s
    q0, q1, q2, q3, q4, q5, q6, q7 = _LOG1P_Q
    p = ((((((q7 * s2 + q6) * s2 + q5) * s2 + q4) * s2 + q3) * s2 + q2) * s2 + q1) * s2 + q0
    return _TWO * s * p


def vexp(x: float) -> float:
    """exp(x): vectorisable polynomial for float32, ``math.exp`` for float64 (numba overload below)."""
    return math.exp(x)


def vlog1p_unit(e: float) -> float:
    """log1p(e) for e in [0, 1]: vectorisable series for float32, ``math.log1p`` for float64."""
    return math.log1p(e)


if numba is not None:
    # numba's overload protocol needs the typing function and its implementation to have identical signatures,
    # so neither is annotated; LLVM inlines the float32 versions into the kernels and vectorises them
    exp_f32_jit = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)(_exp_f32)
    log1p_unit_f32_jit = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)(_log1p_unit_f32)

    @overload(vexp)
    def _exp_overload(x):
        if x == types.float32:
            return lambda x: exp_f32_jit(x)
        return lambda x: math.exp(x)

    @overload(vlog1p_unit)
    def _log1p_overload(e):
        if e == types.float32:
            return lambda e: log1p_unit_f32_jit(e)
        return lambda e: math.log1p(e)

    def jit(parallel: bool = False, inline: bool = False) -> Callable[[Callable], Callable]:
        """``numba.njit`` with the backend's options (cached, fastmath without nnan / ninf, no GIL).

        ``inline`` inlines the function into its callers in numba's IR, which drops the reference counting of the
        array views passed to it (LLVM inlines after numba has already emitted those).
        """
        options = {"inline": "always"} if inline else {}
        return numba.njit(parallel=parallel, cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True, **options)

    prange = numba.prange
else:  # keep the module importable; the kernels are never called without numba

    def jit(parallel: bool = False, inline: bool = False) -> Callable[[Callable], Callable]:
        """Identity decorator (numba is missing)."""
        return lambda fn: fn

    prange = range


@jit()
def softplus(x: float, one: float, threshold: float) -> float:
    """Softplus as torch computes it (beta 1): x above ``threshold``, else max(x, 0) + log1p(exp(-|x|))."""
    zero = one - one
    sp = (x if x > zero else zero) + vlog1p_unit(vexp(-abs(x)))
    return x if x > threshold else sp


@jit()
def sigmoid(x: float, one: float) -> float:
    """1 / (1 + exp(-x)), from exp(-|x|) so it never overflows."""
    e = vexp(-abs(x))
    r = one / (one + e)
    return r if x >= one - one else e * r


@jit()
def softplus_and_grad(x: float, one: float, threshold: float) -> tuple[float, float]:
    """(softplus(x), softplus'(x)) from one exp: softplus' is sigmoid(x) up to ``threshold`` and 1 above."""
    zero = one - one
    e = vexp(-abs(x))
    sp = (x if x > zero else zero) + vlog1p_unit(e)
    r = one / (one + e)
    sig = r if x >= zero else e * r
    return (x if x > threshold else sp), (sig if x <= threshold else one)


@jit(inline=True)
def step_sizes(
    x_row: np.ndarray, bias: float, n_steps: int, flags: tuple[bool, bool], dt: np.ndarray, dsp: np.ndarray
) -> None:
    """Δ_i = softplus(x_i + bias) (or x_i + bias) into ``dt``, and with need_grad dΔ_i / dx_i into ``dsp``.

    ``x_row`` holds the raw delta of one channel's chunk (a row view); ``flags`` = (softplus, need_grad).
    """
    softplus_on, need_grad = flags
    one = x_row.dtype.type(1.0)
    threshold = x_row.dtype.type(_SOFTPLUS_THRESHOLD)
    if softplus_on and need_grad:
        for i in range(n_steps):
            dt[i], dsp[i] = softplus_and_grad(x_row[i] + bias, one, threshold)
    elif softplus_on:
        for i in range(n_steps):
            dt[i] = softplus(x_row[i] + bias, one, threshold)
    else:
        for i in range(n_steps):
            dt[i] = x_row[i] + bias
        if need_grad:
            for i in range(n_steps):
                dsp[i] = one
