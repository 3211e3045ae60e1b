#!/usr/bin/env python3
"""Golden values for tests/trainer.rs: two optimizer steps of torch.optim.AdamW.

The test runs `Trainer::step_on` twice on a tiny LORS model whose weights and gradients come
from closed-form formulas (mirrored in tests/trainer.rs; the gradients replace the model's
through the `GradSync` hook, so the reference needs no model). This script takes the same
weights and gradients, rounded to float32 as the Rust side stores them, and applies in
float64, with torch only:

  * `torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)` (global L2 norm over every tensor);
  * `torch.optim.AdamW` with four parameter groups, assigned from the parameter *names*:
      matrices (rank 2: embedding, LM head, shared bases, private full weights): lr, wd;
      norm gains (rank 1):                 lr,                     weight decay 0;
      private factors A (`*.lors_a`):      lr * PRIVATE_LR_MULT,   PRIVATE_WD;
      private factors B (`*.lors_b`):      lr * PRIVATE_B_LR_MULT, PRIVATE_WD;
  * `torch.optim.lr_scheduler.LambdaLR` for the linear warmup: step s (1-based) runs at
    lr * s / WARMUP.

Step 1 has a gradient norm above GRAD_CLIP (clipped), step 2 one below it (not scaled).
AdamW's eps is large (1e-2, about the size of the gradient entries): at step 1 the update is
lr * g / (|g| + eps), which with a tiny eps would be lr * sign(g) whatever the gradient's
scale, and clipping would not show.

Prints Rust items that tests/trainer.rs pastes (everything after the line
`// ---- output of scripts/trainer_step_reference.py`): per parameter, in name order (= the
Trainer's order), the change p - p0 after each step at four indices, and over the whole tensor
sum(dp), sum(|dp|), sum(dp^2); the learning rate and the gradient norm of each step.

Regenerate (torch is not a test or CI dependency; the CPU run of the plain PyPI wheel):
    python3 -m venv /tmp/ref-venv && /tmp/ref-venv/bin/pip install torch numpy
    /tmp/ref-venv/bin/python scripts/trainer_step_reference.py
"""

import numpy as np
import torch

# The test's config (tests/trainer.rs `ref_config`).
VOCAB, D, LAYERS, HEADS, KV_HEADS, FFN, RANK, GROUPS = 16, 8, 4, 2, 1, 16, 2, 2
PRIVATE_LAYERS = [3]  # full private weights, no LORS factors
LR, WARMUP, WD, BETAS, EPS, GRAD_CLIP = 0.4, 4, 0.1, (0.9, 0.95), 1e-2, 1.0
PRIVATE_LR_MULT, PRIVATE_B_LR_MULT, PRIVATE_WD = 2.0, 4.0, 0.03
GRAD_AMP = [0.2, 0.02]  # per step: gradient norms of about 6.5 (clipped) and 0.65 (not)
PROJ = ["q", "k", "v", "o", "gate", "up", "down"]


def names_and_shapes():
    """Every parameter, sorted by name (the Rust ParamStore's order); k = index here."""
    hd = D // HEADS
    shape = {"q": [D, D], "k": [KV_HEADS * hd, D], "v": [KV_HEADS * hd, D], "o": [D, D],
             "gate": [FFN, D], "up": [FFN, D], "down": [D, FFN]}
    out = [("embed.weight", [VOCAB, D]), ("norm.weight", [D]), ("lm_head.weight", [VOCAB, D])]
    for g in range(GROUPS):
        out += [(f"shared.{g}.{p}.weight", shape[p]) for p in PROJ]
    for layer in range(LAYERS):
        out += [(f"layers.{layer}.attn_norm.weight", [D]), (f"layers.{layer}.ffn_norm.weight", [D])]
        for p in PROJ:
            o, i = shape[p]
            if layer in PRIVATE_LAYERS:
                out.append((f"layers.{layer}.{p}.weight", [o, i]))
            else:
                out += [(f"layers.{layer}.{p}.lors_a", [RANK, i]), (f"layers.{layer}.{p}.lors_b", [o, RANK])]
    return sorted(out)


def weight(name, n, k):
    """Element i: u = ((31 i^2 + 17 i + 101 k + 7) mod 997 - 498) / 498; gains 0.5 + 0.1 u,
    everything else 0.3 u."""
    i = np.arange(n, dtype=np.int64)
    u = ((31 * i * i + 17 * i + 101 * k + 7) % 997 - 498) / 498.0
    return 0.5 + 0.1 * u if name.endswith("norm.weight") else 0.3 * u


def grad(n, k, step):
    """Element i at step s (0-based): GRAD_AMP[s] * (((37 i^2 + 11 i + 53 k + 211 s + 3) mod 991 - 495) / 495)."""
    i = np.arange(n, dtype=np.int64)
    return GRAD_AMP[step] * (((37 * i * i + 11 * i + 53 * k + 211 * step + 3) % 991 - 495) / 495.0)


def f32(x):
    """float64 values rounded to float32 (as the Rust tensors hold them), back in float64."""
    return torch.tensor(np.asarray(x, dtype=np.float32).astype(np.float64))


def group_of(name):
    if name.endswith(".lors_a"):
        return "a"
    if name.endswith(".lors_b"):
        return "b"
    return "gain" if name.endswith("norm.weight") else "matrix"


def sample_indices(n):
    return [0, n // 3, 2 * n // 3, n - 1]


def fmt(x):
    return repr(float(x))


def main():
    torch.set_default_dtype(torch.float64)
    params = names_and_shapes()
    p0 = {name: f32(weight(name, int(np.prod(s)), k)).reshape(s) for k, (name, s) in enumerate(params)}
    tensors = {name: p0[name].clone().requires_grad_(True) for name, _ in params}
    opts = {"matrix": (1.0, WD), "gain": (1.0, 0.0), "a": (PRIVATE_LR_MULT, PRIVATE_WD),
            "b": (PRIVATE_B_LR_MULT, PRIVATE_WD)}
    groups = [{"params": [tensors[n] for n, _ in params if group_of(n) == g], "lr": LR * mult, "weight_decay": wd}
              for g, (mult, wd) in opts.items()]
    for g, (mult, _) in zip(groups, opts.values()):
        g["mult"] = mult
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: min((done + 1) / WARMUP, 1.0))

    deltas, sums, lrs, norms = [], [], [], []
    for step in range(2):
        for k, (name, s) in enumerate(params):
            tensors[name].grad = f32(grad(int(np.prod(s)), k, step)).reshape(s)
        lrs.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["mult"])
        norms.append(torch.nn.utils.clip_grad_norm_([tensors[n] for n, _ in params], GRAD_CLIP).item())
        opt.step()
        sched.step()
        d = {name: (tensors[name].detach() - p0[name]).flatten() for name, _ in params}
        deltas.append({name: [d[name][j].item() for j in sample_indices(d[name].numel())] for name, _ in params})
        sums.append({name: [d[name].sum().item(), d[name].abs().sum().item(), d[name].pow(2).sum().item()]
                     for name, _ in params})
    assert norms[0] > GRAD_CLIP > norms[1], norms

    print(f"// torch {torch.__version__} (CPU), numpy {np.__version__}; "
          f"gradient norms {norms[0]:.4f} (clipped to {GRAD_CLIP}), {norms[1]:.4f}")
    print(f"const REF_LR: [f64; 2] = [{fmt(lrs[0])}, {fmt(lrs[1])}];")
    print(f"const REF_GRAD_NORM: [f64; 2] = [{fmt(norms[0])}, {fmt(norms[1])}];")
    print("#[rustfmt::skip]")
    print(f"const REF: [RefParam; {len(params)}] = [")
    for name, s in params:
        delta = ", ".join("[" + ", ".join(fmt(x) for x in deltas[t][name]) + "]" for t in range(2))
        sm = ", ".join("[" + ", ".join(fmt(x) for x in sums[t][name]) + "]" for t in range(2))
        print(f'    RefParam {{ name: "{name}", shape: &{list(s)}, delta: [{delta}], sums: [{sm}] }},')
    print("];")


if __name__ == "__main__":
    main()
