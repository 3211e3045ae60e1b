#!/usr/bin/env python3
"""The PyTorch side of `cargo bench --bench kernels` and `cargo bench --bench gemm_split`: the
same pieces of a bench-medium training step (forward + backward, loss sum(y)) and the same
matmul shapes, timed in PyTorch eager on this machine (median of 7, after a warm-up).

Usage: scripts/torch_pieces.py [--threads 2]
PyTorch comes from .venv-torch, installed by scripts/bench_vs_torch.py if missing.
"""
import argparse, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_torch import ensure_torch  # noqa: E402


def timed(f, reps=7):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2]


def row(name, gflop, f):
    s = timed(f)
    rate = f"{gflop / s:8.1f}" if gflop else ""
    print(f"{name:<34} {s * 1e3:8.1f} {rate}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ensure_torch()
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(a.threads)
    b, t, d, h, f, v = 16, 256, 384, 6, 1024, 4096
    n, hd = b * t, d // h
    print(f"torch {torch.__version__}, {a.threads} threads; forward + backward, median ms and GFLOP/s")
    print(f"{'piece':<34} {'ms':>8} {'GFLOP/s':>8}")
    for name, o, i in [("q/k/v/o", d, d), ("gate/up", f, d), ("down", d, f)]:
        x = torch.randn(b, t, i, requires_grad=True)
        w = (torch.randn(o, i) * 0.02).requires_grad_()
        row(f"linear {name} {i}->{o}", 6 * n * o * i / 1e9, lambda: F.linear(x, w).sum().backward())
    x = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.02).requires_grad_()
    tg = torch.randint(0, v, (n,))
    row("LM head + cross-entropy", 6 * n * d * v / 1e9,
        lambda: F.cross_entropy(x @ w.t(), tg, reduction="sum").backward())
    q, k, vv = (torch.randn(b, h, t, hd, requires_grad=True) for _ in range(3))
    row("attention (causal, SDPA)", 7 * 2 * b * h * t * t * hd / 1e9 / 2,
        lambda: F.scaled_dot_product_attention(q, k, vv, is_causal=True).sum().backward())
    xr, g = torch.randn(b, t, d, requires_grad=True), torch.ones(d, requires_grad=True)
    row("rms_norm", 0, lambda: (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5) * g).sum().backward())
    gate, up = torch.randn(b, t, f, requires_grad=True), torch.randn(b, t, f, requires_grad=True)
    row("swiglu", 0, lambda: (F.silu(gate) * up).sum().backward())
    print(f"\nmatmuls (GFLOP/s), {a.threads} threads as above and 1 thread")
    for m, nn, kk, at in [(4096, 384, 384, False), (4096, 1024, 384, False), (4096, 384, 1024, False),
                          (4096, 4096, 384, False), (4096, 384, 4096, False), (384, 384, 4096, True),
                          (1024, 384, 4096, True), (384, 1024, 4096, True), (4096, 384, 4096, True)]:
        A = torch.randn(kk, m).t() if at else torch.randn(m, kk)
        B = torch.randn(kk, nn)
        rates = []
        for th in (a.threads, 1):
            torch.set_num_threads(th)
            rates.append(2 * m * nn * kk / timed(lambda: A @ B) / 1e9)
        torch.set_num_threads(a.threads)
        shape = f"{m} x {nn} x {kk}" + (" (Aᵀ)" if at else "")
        print(f"{shape:<22} {rates[0]:8.1f} {rates[1]:8.1f}")


if __name__ == "__main__":
    main()
