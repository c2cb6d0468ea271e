"""The implicit attention of one SS2D layer, computed from the tensors its selective scan receives.

A selective scan with a diagonal A unrolls into ``y_t = Σ_{s≤t} C_t · exp(Σ_{s<τ≤t} Δ_τ A) · Δ_s B_s · u_s`` (+ D·u),
a causal, data-dependent mixing matrix per channel (Ali et al., "The Hidden Attention of Mamba Models", arXiv
2403.01590). VMamba's analysis code (``MzeroMiko/VMamba`` ``analyze/utils.py``, ``AttnMamba.attnmap_mamba``) turns it
into a token-by-token map for SS2D, and OpenUS (arXiv 2511.11510) uses that map, mode ``"all_norm_CwBw"``, on the
teacher to choose which tokens to mask. :func:`mamba_attention_map` computes the same map;
``docs/ops/mamba_attention.md`` has the formulas, the modes, the raster re-ordering and where visionkit differs from
the release.

With ``w_t = exp(Σ_{τ≤t} Δ_τ A)`` (per channel and state), the per-channel map of each mode is
``att[t, s] = Σ_n q_{t,n} · k_{s,n}`` for ``s ≤ t`` and 0 above the diagonal, with

- ``"CB"``: ``q = C_t``, ``k = B_s`` (no decay);
- ``"CBdt"``: ``q = C_t``, ``k = B_s · Δ_s``;
- ``"CwBw"``: ``q = C_t · w_t``, ``k = B_s / max(w_s, 1e-20)`` (OpenUS's mode, the release's clamp);
- ``"CwBdtw"``: ``q = C_t · w_t``, ``k = B_s · Δ_s / max(w_s, 1e-20)``: the true SSM kernel, i.e. ``"CwBw"`` with the
  Δ_s factor that the release omits (OpenUS's paper-kernel variant);
- ``"ww"``: ``q = w_t``, ``k = 1 / max(w_s, 1e-20)`` (the decay alone).

Memory: the per-channel ``(L, L)`` maps are never formed. Because the mean over channels is linear, it is taken inside
one batched matrix product per chunk of channels, ``Σ_{d,n} q[d, n, t] · k[d, n, s]``, so the working set is the
``(batch, chunk, N, L)`` factors plus one ``(batch, L, L)`` accumulator per direction, instead of the release's
``(batch · K · D, L, L)`` tensor (3.8 GB in fp32 for 64 crops at VMamba-S stage 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visionkit.ops.cross_scan import CROSS_SCAN_DIRECTIONS, cross_scan

__all__ = ["MAMBA_ATTENTION_MODES", "mamba_attention_map", "raster_order"]

#: The modes of the release's ``AttnMamba.attnmap_mamba`` (the part of ``mode`` after the last underscore).
MAMBA_ATTENTION_MODES: tuple[str, ...] = ("CB", "CBdt", "CwBw", "CwBdtw", "ww")
#: The release's lower bound on ``w_s`` before dividing by it (``ws.clamp(min=1e-20)``).
DECAY_CLAMP = 1e-20
#: Bytes one chunk's working tensors may take when ``channel_chunk`` is not given (about 4 tensors of this size).
DEFAULT_CHUNK_BYTES = 64 * 2**20

_USES_DECAY = {"CwBw", "CwBdtw", "ww"}
_USES_DELTA_S = {"CBdt", "CwBdtw"}


def raster_order(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """The raster index of every position of the four scan sequences (the permutation ``cross_merge`` undoes).

    Args:
        height: Grid rows H.
        width: Grid columns W.
        device: Device of the result.

    Returns:
        ``(4, H·W)`` int64: entry ``[k, p]`` is the row-major index ``h·W + w`` of the pixel at position ``p`` of scan
        sequence ``k`` (row-major, column-major, reversed row-major, reversed column-major).
    """
    grid = torch.arange(height * width, device=device).view(1, 1, height, width)
    return cross_scan(grid)[0, :, 0]


def mamba_attention_map(
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    height: int,
    width: int,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    mode: str = "CwBw",
    normalize: bool = True,
    channel_chunk: int | None = None,
) -> Tensor:
    """Token-to-token attention of one SS2D layer, in raster order, from its selective-scan inputs.

    Per direction k and channel d, the map of ``mode`` (module docstring) is built in the direction's own sequence
    order and zeroed above the diagonal; the D channels of a direction are averaged; each direction's map is moved to
    raster order on both axes (query and key) and the four are summed. The cumulative sum of ``Δ·A`` and everything
    after it run in float32, or in float64 when an input is float64.

    Args:
        delta: Step sizes before bias and softplus, as given to the scan, ``(batch, K·D, L)``.
        A: State matrix, negative (``-exp(A_logs)``), ``(K·D, N)``.
        B: Input projections, one group per direction, ``(batch, K, N, L)``.
        C: Output projections, ``(batch, K, N, L)``.
        height: Grid rows H of the scanned map.
        width: Grid columns W; ``L = H·W``.
        delta_bias: Added to ``delta`` before the softplus, ``(K·D,)``.
        delta_softplus: Apply softplus to ``delta + delta_bias`` (SS2D does).
        mode: ``"CB"``, ``"CBdt"``, ``"CwBw"`` (OpenUS), ``"CwBdtw"`` (true kernel, with Δ_s) or ``"ww"``.
        normalize: Min-max normalise over the whole ``(batch, L, L)`` result, ``(x - min) / (max - min)``; a constant
            result (``max == min``, where the release divides 0 by 0) becomes all zeros.
        channel_chunk: Channels per direction processed at once; ``None`` picks the largest chunk whose
            ``(batch, chunk, N, L)`` working tensors stay under 64 MiB each. The result does not depend on it beyond
            floating-point summation order.

    Returns:
        ``(batch, L, L)``: row = query token, column = key token, both raster (row-major) indices; in ``[0, 1]`` when
        normalised.

    Raises:
        ValueError: Wrong shapes (naming the tensor, its shape and the expected one), ``L != H·W``, an unknown mode,
            or a non-positive ``channel_chunk``.
    """
    k_dirs = CROSS_SCAN_DIRECTIONS
    batch, channels, length, n_state = _check_inputs(delta, A, B, C, delta_bias, height, width, mode)
    d_inner = channels // k_dirs
    dtype = _compute_dtype(delta, A, B, C, delta_bias)
    chunk = _resolve_chunk(channel_chunk, d_inner, batch, n_state, length, dtype)
    order = raster_order(height, width, device=delta.device)
    total = torch.zeros(batch, length, length, dtype=dtype, device=delta.device)
    for k in range(k_dirs):
        b_k, c_k = B[:, k].to(dtype), C[:, k].to(dtype)  # (batch, N, L)
        acc = torch.zeros(batch, length, length, dtype=dtype, device=delta.device)
        for start in range(k * d_inner, (k + 1) * d_inner, chunk):
            stop = min(start + chunk, (k + 1) * d_inner)
            bias = None if delta_bias is None else delta_bias[start:stop]
            q, key = _chunk_factors(delta[:, start:stop], A[start:stop], b_k, c_k, bias, delta_softplus, mode, dtype)
            # Σ over the chunk's channels and states at once: (batch, L, c·N) @ (batch, c·N, L).
            acc = acc.baddbmm(q.flatten(1, 2).transpose(1, 2), key.flatten(1, 2))
        # tril writes zeros above the diagonal whatever is there: the upper part may hold inf or nan (there w_t / w_s
        # grows without bound), and none of it may reach the result.
        acc = torch.tril(acc) / d_inner
        inverse = torch.argsort(order[k])  # raster index -> position in sequence k
        total = total + acc[:, inverse][:, :, inverse]
    if normalize:
        total = _min_max(total)
    return total


def _check_inputs(
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Tensor | None,
    height: int,
    width: int,
    mode: str,
) -> tuple[int, int, int, int]:
    """Validate the shapes; returns ``(batch, K·D, L, N)``."""
    if mode not in MAMBA_ATTENTION_MODES:
        raise ValueError(f"mamba_attention_map: unknown mode {mode!r}; choose one of {MAMBA_ATTENTION_MODES}")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"mamba_attention_map: height and width must be positive ints, got {height!r} x {width!r}")
    if delta.dim() != 3:
        raise ValueError(f"mamba_attention_map: delta must be (batch, K·D, L), got shape {tuple(delta.shape)}")
    batch, channels, length = delta.shape
    k = CROSS_SCAN_DIRECTIONS
    if length != height * width:
        raise ValueError(
            f"mamba_attention_map: delta has L = {length} positions but height x width = {height} x {width} = "
            f"{height * width}"
        )
    if channels % k:
        raise ValueError(
            f"mamba_attention_map: delta has {channels} channels, not a multiple of the {k} scan directions "
            f"(shape {tuple(delta.shape)})"
        )
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"mamba_attention_map: A must have shape ({channels}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    expected = (batch, k, n_state, length)
    for name, tensor in (("B", B), ("C", C)):
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"mamba_attention_map: {name} must have shape (batch, K, N, L) = {expected}, got {tuple(tensor.shape)}"
            )
    if delta_bias is not None and tuple(delta_bias.shape) != (channels,):
        raise ValueError(
            f"mamba_attention_map: delta_bias must have shape ({channels},), got {tuple(delta_bias.shape)}"
        )
    return batch, channels, length, n_state


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _resolve_chunk(
    channel_chunk: int | None, d_inner: int, batch: int, n_state: int, length: int, dtype: torch.dtype
) -> int:
    if channel_chunk is None:
        per_channel = batch * n_state * length * torch.empty((), dtype=dtype).element_size()
        return max(1, min(d_inner, DEFAULT_CHUNK_BYTES // max(per_channel, 1)))
    if isinstance(channel_chunk, bool) or int(channel_chunk) != channel_chunk or channel_chunk < 1:
        raise ValueError(f"mamba_attention_map: channel_chunk must be a positive int or None, got {channel_chunk!r}")
    return min(int(channel_chunk), d_inner)


def _chunk_factors(
    delta: Tensor,
    A: Tensor,
    b_k: Tensor,
    c_k: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    mode: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Query and key factors ``(batch, c, N, L)`` of one chunk of c channels of one direction.

    Args:
        delta: ``(batch, c, L)`` raw step sizes.
        A: ``(c, N)``.
        b_k: The direction's B, ``(batch, N, L)``, in ``dtype``.
        c_k: The direction's C, ``(batch, N, L)``, in ``dtype``.
        delta_bias: ``(c,)`` or None.
        delta_softplus: Apply softplus.
        mode: One of :data:`MAMBA_ATTENTION_MODES`.
        dtype: Compute dtype.

    Returns:
        ``(q, k)`` with ``att[t, s] = Σ_{c, n} q[:, c, n, t] · k[:, c, n, s]`` (before masking and the mean).
    """
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    channels = dt.shape[1]
    q = c_k[:, None].expand(-1, channels, -1, -1)
    key = b_k[:, None].expand(-1, channels, -1, -1)
    if mode in _USES_DECAY:
        w = torch.cumsum(dt[:, :, None, :] * A.to(dtype)[None, :, :, None], dim=-1).exp()  # (batch, c, N, L)
        inv_w = 1.0 / w.clamp(min=DECAY_CLAMP)
        q, key = (w, inv_w) if mode == "ww" else (q * w, key * inv_w)
    if mode in _USES_DELTA_S:
        key = key * dt[:, :, None, :]
    return q, key


def _min_max(x: Tensor) -> Tensor:
    """``(x - min) / (max - min)`` over the whole tensor; zeros when ``max == min`` (no host synchronisation)."""
    low, high = x.min(), x.max()
    span = high - low
    return (x - low) / torch.where(span > 0, span, torch.ones_like(span))
