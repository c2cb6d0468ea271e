"""Benchmark: Mod-Squad's MoE layers against FLOP-equal dense layers and the released dispatch, in one process.

Parts (``--parts``, default both), fwd+bwd of one layer on ``images × tokens`` tokens (gradients of the input and of
every parameter), ViT-B sizes (``docs/methods/modsquad.md`` §1):

(mlp) MoE-MLP: dim 768, 16 experts, top-4, expert hidden 768, GELU, biases; one task router (random, std 0.02 as the
      released model's timm init leaves it). Compared: ``dense`` = ``Linear(768, 3072)`` GELU ``Linear(3072, 768)``
      (the same FLOPs per token as 4 active experts); ``released`` = the release's dispatch rewritten here
      (``compute_gating``: scatter, ``nonzero``, sort; ``x[batch_index]``; ``ParallelLinear`` with
      ``expert_size.tolist()`` and a per-expert ``torch.mm`` loop, forward and backward; gate product and
      ``index_add``); ``visionkit-<backend>`` = :class:`visionkit.models.layers.TaskMoE` with that backend.
(moa) Mixture of attention heads: 24 experts, 12 heads per token, head_dim 128, shared K/V. Compared: ``vit-b`` =
      dense ViT-B attention (12 heads x 64, qkv + proj, SDPA); ``dense-128`` = the release's dense ``Attention`` of
      the other blocks (12 heads x 128: the same attention-core FLOPs as MoA, 1.8x its projection FLOPs);
      ``released`` = the release's ``map`` / einsum attention / ``reduce`` with its dispatch; ``visionkit-<backend>``
      = :class:`visionkit.models.layers.MoAttention`.

Ratios (of medians): ``x dense`` = time / time of the dense reference (``dense`` for mlp, ``vit-b`` for moa);
``released x`` = released time / this time. Targets (CPU, MoE-MLP): visionkit <= 1.5x dense and >= 2x faster
than ``released``.

The CPU section runs in ``--cpu-dtype`` (float32 default); the CUDA section in bf16 autocast (fp32 parameters, as in
training), where ``auto`` is grouped_mm; without CUDA it prints "skipped: no CUDA". Times are the median (and
minimum) of ``--repeats`` rounds after one warm-up, the candidates taking turns within each round so that a change of
machine load hits all of them alike (CUDA: synchronised wall time). On a machine whose cores are busy, keep
``--threads`` below the free cores: candidates made of many small GEMMs (the loops) then wait for descheduled OpenMP
threads at every call and read 2-10x slower than they are, while the dense layers barely change.

Full run (the numbers in docs/benchmarks.md; about 15 min on a 2-core CPU)::

    .venv/bin/python bench/moe.py --device cpu,cuda --tokens 197,4096 --cpu-images 8,1 --cuda-images 128,8 \
        --repeats 5 --threads 2

Dry run::

    .venv/bin/python bench/moe.py --tokens 197 --cpu-images 1 --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionkit.models.layers import MoAttention, TaskMoE

DIM = 768
MLP = {"experts": 16, "k": 4, "hidden": 768}  # expert hidden = 3072 / 4
MOA = {"experts": 24, "k": 12, "head_dim": 128}
BACKENDS = ("loop", "grouped_mm", "dense")


# ------------------------------------------------------------------ the release's dispatch, rewritten for timing


class _ReleasedParallelLinear(torch.autograd.Function):
    """``ParallelLinear`` of the release: host-side sizes, one ``torch.mm`` per expert, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, sizes, w, b)
        out = x.new_empty(x.shape[0], w.shape[2])
        split = sizes.tolist()
        for i, (xi, oi) in enumerate(zip(x.split(split), out.split(split), strict=True)):
            torch.mm(xi, w[i], out=oi)
            if b is not None:
                oi.add_(b[i])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor, Tensor | None]:
        x, sizes, w, b = ctx.saved_tensors
        split = sizes.tolist()
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        db = torch.empty_like(b) if b is not None else None
        for i, (xi, gi, dxi) in enumerate(zip(x.split(split), grad.split(split), dx.split(split), strict=True)):
            torch.mm(gi, w[i].t(), out=dxi)
            torch.mm(xi.t(), gi, out=dw[i])
            if db is not None:
                torch.sum(gi, dim=0, out=db[i])
        return dx, None, dw, db


def _released_gating(x: Tensor, gate_w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Router + ``compute_gating``: (batch_gates, batch_index, expert_size, index_sorted_experts)."""
    probs = torch.softmax(x @ gate_w.t(), dim=1) + 1e-4
    top_gates, top_idx = probs.topk(k, dim=1)
    gates = torch.zeros_like(probs).scatter(1, top_idx, top_gates)
    flat_gates, flat_experts = top_gates.flatten(), top_idx.flatten()
    nonzeros = flat_gates.nonzero().squeeze(-1)  # a host sync (output size depends on the data)
    _, order = flat_experts[nonzeros].sort(0)
    index_sorted = nonzeros[order]
    return flat_gates[index_sorted], index_sorted.div(k, rounding_mode="trunc"), (gates > 0).long().sum(0), index_sorted


def _cast(*ts: Tensor | None) -> list[Tensor | None]:
    """The release's ``custom_fwd(cast_inputs=...)``: its expert GEMMs run in the autocast dtype."""
    if not torch.is_autocast_enabled(ts[0].device.type):
        return list(ts)
    dtype = torch.get_autocast_dtype(ts[0].device.type)
    return [t.to(dtype) if t is not None else None for t in ts]


def released_moe_mlp(m: TaskMoE, x: Tensor) -> Tensor:
    """The release's ``TaskMoE.forward`` on the parameters of a visionkit ``TaskMoE`` (task 0)."""
    flat = x.reshape(-1, x.shape[-1])
    gates, batch_index, sizes, _ = _released_gating(flat, m.f_gate[0][0].weight, m.k)
    with torch.autocast(x.device.type, enabled=False):
        h = _ReleasedParallelLinear.apply(*_cast(flat[batch_index], sizes, m.experts.w, m.experts.b))
        h = _ReleasedParallelLinear.apply(*_cast(F.gelu(h), sizes, m.output_experts.w, m.output_experts.b))
    h = h * gates[:, None]
    return (
        torch.zeros(flat.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
        .index_add(0, batch_index, h)
        .view(x.shape)
    )


def released_moa(m: MoAttention, x: Tensor) -> Tensor:
    """The release's ``MoETaskAttention.forward`` (``map``, einsum attention, ``reduce``) on a visionkit MoAttention."""
    b, length, d = x.shape
    q_proj, k, hd = m.q_proj, m.k, m.head_dim
    flat = x.reshape(-1, d)
    gates, batch_index, sizes, index_sorted = _released_gating(flat, q_proj.f_gate[0][0].weight, k)
    with torch.autocast(x.device.type, enabled=False):
        q_rows = _ReleasedParallelLinear.apply(*_cast(flat[batch_index], sizes, q_proj.experts.w, None))
    q = torch.zeros(b * length * k, hd, dtype=q_rows.dtype, device=x.device).index_add(0, index_sorted, q_rows)
    key, value = m.kv_proj(x).chunk(2, dim=-1)
    attn = torch.einsum("bihd,bjd->bhij", q.view(b, length, k, hd), key.to(q.dtype)) * m.scale
    o = torch.einsum("bhij,bjd->bihd", attn.softmax(dim=-1), value.to(q.dtype)).reshape(-1, hd)
    with torch.autocast(x.device.type, enabled=False):
        y = _ReleasedParallelLinear.apply(*_cast(o[index_sorted], sizes, q_proj.output_experts.w, None))
    y = y * gates[:, None]
    return torch.zeros(b * length, d, dtype=y.dtype, device=x.device).index_add(0, batch_index, y).view(b, length, d)


# ------------------------------------------------------------------ dense references


class DenseAttention(nn.Module):
    """ViT attention (qkv, SDPA, proj) with ``heads x head_dim`` inner width."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


# ------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_runner(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor, amp: bool) -> Callable[[], float]:
    """A callable that runs forward + backward (input and parameter gradients) once and returns its seconds."""
    x = x.detach().requires_grad_()
    cot = torch.randn_like(x)

    def run() -> float:
        module.zero_grad(set_to_none=True)
        x.grad = None
        _sync(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = fn(x)
        y.backward(cot.to(y.dtype))
        _sync(x.device)
        return time.perf_counter() - t0

    return run


def time_interleaved(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per runner; one warm-up each, then ``repeats`` rounds taking every runner in turn, so
    that a change of machine load hits all candidates alike. A runner that fails gets NaN (message printed)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(repeats + 1):
        for name, run in runners.items():
            if times[name] is None:
                continue
            try:
                t = run()
            except (RuntimeError, MemoryError) as exc:  # e.g. a backend unsupported on this device
                print(f"  {name}: failed ({str(exc).splitlines()[0][:100]})")
                times[name] = None
                continue
            if round_:
                times[name].append(t)
    nan = float("nan")
    return {n: (statistics.median(t), min(t)) if t else (nan, nan) for n, t in times.items()}


def _random_routers(layer: nn.Module) -> nn.Module:
    """Router weights as the released model starts them (timm init: normal, std 0.02), not zero."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "f_gate" in name:
                p.normal_(std=0.02)
    return layer


def candidates(part: str, device: torch.device) -> tuple[dict[str, tuple[nn.Module, Callable]], str]:
    """Name -> (module, forward) for one part, and the name of the dense reference."""
    torch.manual_seed(0)
    if part == "mlp":
        dense = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        out = {"dense": (dense, dense)}
        moe = _random_routers(TaskMoE(DIM, MLP["hidden"], MLP["experts"], MLP["k"], num_tasks=1))
        out["released"] = (moe, lambda x, m=moe: released_moe_mlp(m, x))
        for backend in BACKENDS:
            layer = _random_routers(TaskMoE(DIM, MLP["hidden"], MLP["experts"], MLP["k"], 1, backend=backend))
            layer.load_state_dict(moe.state_dict())
            out[f"visionkit-{backend}"] = (layer, lambda x, m=layer: m(x, 0))
        ref = "dense"
    else:
        vit_b, dense_128 = DenseAttention(DIM, 12, 64), DenseAttention(DIM, 12, MOA["head_dim"])
        out = {"vit-b": (vit_b, vit_b), "dense-128": (dense_128, dense_128)}
        moa = _random_routers(MoAttention(DIM, MOA["experts"], MOA["k"], MOA["head_dim"], num_tasks=1))
        out["released"] = (moa, lambda x, m=moa: released_moa(m, x))
        for backend in BACKENDS:
            layer = MoAttention(DIM, MOA["experts"], MOA["k"], MOA["head_dim"], 1, backend=backend)
            layer.load_state_dict(moa.state_dict())
            out[f"visionkit-{backend}"] = (layer, lambda x, m=layer: m(x, 0))
        ref = "vit-b"
    return {name: (m.to(device), fn) for name, (m, fn) in out.items()}, ref


def run_section(
    device: torch.device, dtype: torch.dtype, amp: bool, args: argparse.Namespace, images: list[int]
) -> None:
    for part in args.parts.split(","):
        mods, ref = candidates(part, device)
        for m, _ in mods.values():
            m.to(dtype)
        for tokens, n_img in zip(args.tokens, images, strict=True):
            x = torch.nn.functional.layer_norm(torch.randn(n_img, tokens, DIM, device=device), (DIM,)).to(dtype)
            runners = {name: fwd_bwd_runner(fn, m, x, amp) for name, (m, fn) in mods.items()}
            results = time_interleaved(runners, args.repeats)
            print(f"\n{part}: {n_img} image(s) x {tokens} tokens = {n_img * tokens} tokens, fwd+bwd")
            print(f"{'candidate':<22}{'median s':>10}{'min s':>9}{'x ' + ref:>12}{'released x':>12}")
            for name, (med, best) in results.items():
                print(f"{name:<22}{med:10.4f}{best:9.4f}{med / results[ref][0]:11.2f}x"
                      f"{results['released'][0] / med:11.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu,cuda", help="comma-separated sections: cpu, cuda")
    parser.add_argument("--parts", default="mlp,moa", help="comma-separated: mlp, moa")
    parser.add_argument("--tokens", default="197,4096", help="tokens per image (197 = 224 px ViT-B/16 + cls)")
    parser.add_argument("--cpu-images", default="8,1", help="images per --tokens entry on CPU")
    parser.add_argument("--cuda-images", default="128,8", help="images per --tokens entry on CUDA")
    parser.add_argument("--cpu-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    print(f"median of {args.repeats} after 1 warm-up; MoE-MLP {MLP}, MoA {MOA}, dim {DIM}")
    for section in args.device.split(","):
        if section == "cpu":
            print(f"\n=== CPU, {args.cpu_dtype} (auto backend = loop) ===")
            images = [int(i) for i in args.cpu_images.split(",")]
            run_section(torch.device("cpu"), getattr(torch, args.cpu_dtype), False, args, images)
        elif section == "cuda":
            print("\n=== CUDA, bf16 autocast (auto backend = grouped_mm) ===")
            if not torch.cuda.is_available():
                print("skipped: no CUDA")
                continue
            print(f"device: {torch.cuda.get_device_name()}")
            images = [int(i) for i in args.cuda_images.split(",")]
            run_section(torch.device("cuda"), torch.float32, True, args, images)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
