#!/usr/bin/env python3
"""Training throughput of lors-lm against PyTorch eager on the same model, same machine, same
run: the same Llama + LORS architecture (RMSNorm, rotate-half RoPE, SwiGLU, tied head, LORS
W_l = W_shared + B_l A_l merged per step), the same init scheme, AdamW, batch, sequence length
and thread count. Prints tokens/s of both and the ratio lors-lm / PyTorch, for vanilla and LORS
at each benchmark config.

Each round measures, per mode, lors-lm (a fresh `lors-lm bench` process) and then PyTorch, so
that a slow spell of the machine hits both; the ratio reported is the median of the per-round
ratios, with their range.

Usage: scripts/bench_vs_torch.py [--threads 2] [--steps 8] [--rounds 3] [--build LABEL=PATH]...
                                 [--blas auto,gemm] [CONFIG...]
       scripts/bench_vs_torch.py --torch-only --device cuda --dtype bf16 --compile CONFIG
           PyTorch alone, eager and torch.compile, on a GPU (scripts/gpu_check.sh puts it beside
           `lors-lm train` on the same GPU and model).
Several --build binaries, and each under several matmul libraries (--blas sets LORS_LM_BLAS:
auto = OpenBLAS where installed, gemm = the gemm crate), are measured in the same rounds
against the same PyTorch runs.
PyTorch is installed into .venv-torch by this script unless TORCH_PYTHON names a Python that
already has torch (it is not a test dependency). The script re-runs itself under that Python.
"""
import argparse, json, math, os, statistics, subprocess, sys, time, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_torch():
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    py = os.environ.get("TORCH_PYTHON")
    if not py:
        venv = ROOT / ".venv-torch"
        py = str(venv / "bin" / "python")
        if not Path(py).exists():
            subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
            subprocess.check_call([py, "-m", "pip", "install", "--quiet", "torch"])
    os.execv(py, [py, *sys.argv])


def torch_bench(cfg, mode, steps, warmup, threads, device="cpu", dtype="f32", compile_=False, vocab=4096,
                stats=None):
    """PyTorch tokens/s of one training step of `cfg` in `mode`: f32, or bf16 autocast over f32
    master weights (lors-lm's `train.dtype = "bf16"`); eager, or `torch.compile`d. `stats`, if
    given, receives the peak accelerator memory (MiB) and the last loss."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, lc, tc = cfg["model"], cfg.get("lors", {}), cfg["train"]
    V, d, L, H = m["vocab_size"] or vocab, m["d_model"], m["n_layers"], m["n_heads"]
    Hkv = m.get("n_kv_heads", 0) or H
    hd, ffn, T, B = d // H, m["ffn_hidden"], tc["seq_len"], tc["batch_size"]
    rank = lc.get("rank", 16)
    shapes = {"q": (d, d), "k": (Hkv * hd, d), "v": (Hkv * hd, d), "o": (d, d),
              "gate": (ffn, d), "up": (ffn, d), "down": (d, ffn)}

    def normal(*s):
        return nn.Parameter(torch.randn(*s) * 0.02)

    class Proj(nn.Module):
        def __init__(self, base, out, inp):
            super().__init__()
            self.base = base  # shared nn.Parameter or private
            self.lora = mode == "lors"
            if self.lora:
                bound = 1 / math.sqrt(inp)
                self.A = nn.Parameter(torch.empty(rank, inp).uniform_(-bound, bound))
                self.B = nn.Parameter(torch.zeros(out, rank))

        def forward(self, x):
            w = self.base + self.B @ self.A if self.lora else self.base
            return F.linear(x, w)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(device), torch.cat([ang.sin()] * 2, -1).to(device)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = normal(V, d)
            shared = {p: normal(*s) for p, s in shapes.items()} if mode != "vanilla" else None
            self.shared = nn.ParameterDict(shared or {})
            self.layers = nn.ModuleList()
            for _ in range(L):
                blk = nn.Module()
                for p, (o, i) in shapes.items():
                    setattr(blk, p, Proj(self.shared[p] if shared else normal(o, i), o, i))
                blk.n1, blk.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
                self.layers.append(blk)
            self.norm = nn.Parameter(torch.ones(d))

        def forward(self, idx):
            x = self.emb[idx]
            for b in self.layers:
                h = rms(x, b.n1)
                q = b.q(h).view(B, T, H, hd).transpose(1, 2)
                k = b.k(h).view(B, T, Hkv, hd).transpose(1, 2)
                v = b.v(h).view(B, T, Hkv, hd).transpose(1, 2)
                q, k = rope(q), rope(k)
                if Hkv != H:
                    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + b.o(y.transpose(1, 2).reshape(B, T, d))
                h = rms(x, b.n2)
                x = x + b.down(F.silu(b.gate(h)) * b.up(h))
            return F.linear(rms(x, self.norm), self.emb)

    model = Model().to(device)
    if tc.get("tf32", False) and device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    forward = torch.compile(model) if compile_ else model
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        data = torch.randint(0, V, (B, T + 1), device=device)
        t0 = time.perf_counter()
        with autocast:
            logits = forward(data[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, V), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()  # waits for the device
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if stats is not None:
        stats["loss"] = last
        stats["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return B * T / statistics.median(times)


def lors_lm_bench(exe, blas, config, mode, steps, warmup, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), LORS_LM_BLAS=blas)
    out = subprocess.run([exe, "bench", "--config", str(config), "--json", "--modes", mode, "--rounds", "1",
                          "--steps", str(steps), "--warmup", str(warmup), "--prompt-tokens", "0"],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=[ROOT / "configs/bench-small.toml", ROOT / "configs/bench-medium.toml"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--build", action="append", metavar="LABEL=PATH",
                    help="a lors-lm binary to measure (repeatable), e.g. new=target/release/lors-lm "
                         "old=/tmp/lors-lm-old; default: $LORS_LM or target/release/lors-lm")
    ap.add_argument("--blas", default="auto",
                    help="comma-separated LORS_LM_BLAS values to run every build under (auto, openblas, gemm)")
    ap.add_argument("--torch-only", action="store_true",
                    help="measure PyTorch alone (one JSON line per config and mode): for a GPU, where lors-lm's "
                         "side is `lors-lm train` (scripts/gpu_check.sh)")
    ap.add_argument("--device", default="cpu", help="PyTorch device with --torch-only (cpu, cuda)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="with --torch-only: bf16 = autocast")
    ap.add_argument("--compile", action="store_true", help="with --torch-only: also measure torch.compile")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary when a config says 0")
    ap.add_argument("--modes", default="vanilla,lors")
    a = ap.parse_args()
    if a.torch_only:
        ensure_torch()
        import torch
        for c in a.configs:
            cfg = tomllib.loads(Path(c).read_text())
            for mode in a.modes.split(","):
                for compiled in ([False, True] if a.compile else [False]):
                    stats = {}
                    try:
                        tps = torch_bench(cfg, mode, a.steps, a.warmup, a.threads, a.device, a.dtype, compiled,
                                          a.vocab_size, stats)
                        err = None
                    except Exception as e:  # one failing variant (say torch.compile) must not hide the others
                        tps, err = None, f"{type(e).__name__}: {e}"[:500]
                    print(json.dumps({"config": Path(c).stem, "mode": mode, "device": a.device, "dtype": a.dtype,
                                      "compiled": compiled, "torch": torch.__version__, "torch_tokens_per_sec": tps,
                                      "steps": a.steps, "warmup": a.warmup, **stats, "error": err}), flush=True)
        return
    binaries = {}
    for spec in a.build or [f"lors-lm={os.environ.get('LORS_LM', ROOT / 'target' / 'release' / 'lors-lm')}"]:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            sys.exit(f"--build {spec!r}: expected LABEL=PATH naming a lors-lm binary")
        binaries[label] = path
    blas = [b.strip() for b in a.blas.split(",") if b.strip()]
    if not blas or any(b not in ("auto", "openblas", "gemm") for b in blas):
        sys.exit(f"--blas {a.blas!r}: expected a comma-separated list of auto, openblas, gemm")
    # (label, binary, LORS_LM_BLAS) per measured variant; the label names the library when
    # several are measured.
    builds = {(f"{l}/{b}" if len(blas) > 1 else l): (p, b) for l, p in binaries.items() for b in blas}
    ensure_torch()
    import torch
    print(f"torch {torch.__version__}, {a.threads} threads, median of {a.steps} steps after {a.warmup} warm-up, "
          f"{a.rounds} interleaved rounds")
    print(f"{'config':<20} {'build':<14} {'mode':<8} {'lors-lm tok/s':>14} {'torch tok/s':>12} {'ratio (range)':>20}")

    def med_range(xs):
        return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"

    modes = ("vanilla", "lors")
    for c in a.configs:
        cfg = tomllib.loads(Path(c).read_text())
        ours = {(b, m): [] for b in builds for m in modes}  # lors-lm JSON results, one per round
        theirs = {m: [] for m in modes}                      # PyTorch tokens/s, one per round
        for _ in range(a.rounds):
            for mode in modes:
                for label, (exe, b) in builds.items():
                    ours[label, mode].append(lors_lm_bench(exe, b, c, mode, a.steps, a.warmup, a.threads))
                theirs[mode].append(torch_bench(cfg, mode, a.steps, a.warmup, a.threads))
        torch_step = [v / l for l, v in zip(theirs["lors"], theirs["vanilla"])]
        for label in builds:
            for mode in modes:
                o_tps = [r["train_tokens_per_sec"] for r in ours[label, mode]]
                ratios = [o / t for o, t in zip(o_tps, theirs[mode])]
                o, t = statistics.median(o_tps), statistics.median(theirs[mode])
                print(f"{Path(c).stem:<20} {label:<14} {mode:<8} {o:>14.0f} {t:>12.0f} {med_range(ratios):>20}")
                print(json.dumps({"config": Path(c).stem, "build": label, "matmul": ours[label, mode][0].get("matmul"),
                                  "mode": mode, "lors_lm_tokens_per_sec": o,
                                  "torch_tokens_per_sec": t, "ratio": statistics.median(ratios), "ratios": ratios,
                                  "lors_lm_peak_rss_mb": [r["peak_rss_mb"] for r in ours[label, mode]]}))
            # LORS against vanilla within each round, for this build and for PyTorch.
            lo_va = list(zip(ours[label, "lors"], ours[label, "vanilla"]))
            step = [lo["step_ms_median"] / va["step_ms_median"] for lo, va in lo_va]
            rss = [lo["peak_rss_mb"] / va["peak_rss_mb"] for lo, va in lo_va if lo.get("peak_rss_mb") and va.get("peak_rss_mb")]
            print(f"{Path(c).stem:<20} {label:<14} lors/vanilla step time: lors-lm {med_range(step)}, "
                  f"PyTorch {med_range(torch_step)}; lors-lm peak RSS {med_range(rss) if rss else '-'}")


if __name__ == "__main__":
    main()
