#!/usr/bin/env python3
"""Independent numpy reference for a Hugging Face Llama checkpoint (float64 forward pass).

Reads DIR/config.json and DIR/*.safetensors (as written by LlamaForCausalLM.save_pretrained);
tensors may be F32, F16 or BF16 and are all converted to float64. Uses only numpy and
safetensors; BF16 files are decoded here (uint16 << 16 -> float32) since numpy has no bfloat16.

Conventions (as in transformers' modeling_llama):
  * RMSNorm: x / sqrt(mean(x^2) + eps) * w.
  * RoPE, rotate-half: inv_freq_i = 1 / theta^(2i/head_dim), i < head_dim/2; angles
    pos * inv_freq concatenated twice; q' = q*cos + rotate_half(q)*sin with
    rotate_half([x1, x2]) = [-x2, x1]. theta = rope_theta (or rope_parameters.rope_theta).
    Positions start at 0 for every sequence / window.
  * Grouped-query attention: query head h uses kv head h // (n_heads / n_kv_heads);
    scores scaled by 1/sqrt(head_dim), causal softmax.
  * MLP: down(silu(gate(x)) * up(x)); final norm; lm_head (= embed_tokens if tie_word_embeddings).

CLI (JSON on stdout):
  llama_ref.py logits DIR --ids 1,2,3         -> {"logits": [[V floats] per position]}
  llama_ref.py eval DIR --tokens F.bin --dtype u16|u32 --seq-len T
                                              -> {"loss", "ppl", "tokens", "windows"}
  llama_ref.py greedy DIR --ids 1,2,3 --n 32  -> {"ids": [n greedy ids]} (argmax, lowest id on ties)

Eval definition: the little-endian token file is cut into windows of T+1 tokens with stride T
(window k = tokens[k*T : k*T+T+1]); a final window with fewer than T+1 tokens is dropped, so
there are W = (N-1) // T windows. Inputs are window[:-1], targets window[1:]; every position
of every window is predicted. loss = mean cross-entropy over all W*T predicted tokens,
ppl = exp(loss).
"""
import argparse
import glob
import json
import math
import os
import struct

import numpy as np
from safetensors.numpy import load_file

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def load_safetensors(path):
    """Dict name -> float64 array. safetensors' numpy loader for F32/F16, own parser for BF16."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        if all(t["dtype"] in _DTYPES for t in header.values()):
            return {k: v.astype(np.float64) for k, v in load_file(path).items()}
        data = f.read()
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        raw = data[start:end]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in _DTYPES:
            a = np.frombuffer(raw, _DTYPES[t["dtype"]])
        else:
            raise ValueError(f"{name}: unsupported dtype {t['dtype']}")
        out[name] = a.astype(np.float64).reshape(t["shape"])
    return out


class Llama:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope scaling {rope}")
        if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("only silu activation and bias-free projections are supported")
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_heads
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c["rms_norm_eps"]
        self.theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        self.w = {}
        for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
            self.w.update(load_safetensors(path))
        if c.get("tie_word_embeddings", False):
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def rms_norm(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.w[name]

    def lin(self, x, name):
        return x @ self.w[name + ".weight"].T

    def forward(self, ids):
        """ids: int array (B, T) -> logits (B, T, V), float64."""
        ids = np.asarray(ids)
        B, T = ids.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        inv_freq = 1.0 / self.theta ** (np.arange(0, hd, 2) / hd)
        ang = np.outer(np.arange(T), inv_freq)
        ang = np.concatenate([ang, ang], axis=-1)  # (T, hd)
        cos, sin = np.cos(ang), np.sin(ang)

        def rope(x):  # (B, heads, T, hd)
            x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
            return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

        causal = np.triu(np.full((T, T), -np.inf), k=1)
        x = self.w["model.embed_tokens.weight"][ids]  # (B, T, D)
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h = self.rms_norm(x, p + "input_layernorm.weight")
            q = self.lin(h, p + "self_attn.q_proj").reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            k = self.lin(h, p + "self_attn.k_proj").reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            v = self.lin(h, p + "self_attn.v_proj").reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            q, k = rope(q), rope(k)
            k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # head h -> kv h//g
            s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + causal
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            a = (s / s.sum(axis=-1, keepdims=True)) @ v  # (B, H, T, hd)
            x = x + self.lin(a.transpose(0, 2, 1, 3).reshape(B, T, H * hd), p + "self_attn.o_proj")
            h = self.rms_norm(x, p + "post_attention_layernorm.weight")
            g = self.lin(h, p + "mlp.gate_proj")
            x = x + self.lin(g / (1.0 + np.exp(-g)) * self.lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        return self.lin(self.rms_norm(x, "model.norm.weight"), "lm_head")


def evaluate(model, tokens, T, batch):
    W = (len(tokens) - 1) // T
    if W < 1:
        raise ValueError(f"need at least seq_len+1 = {T + 1} tokens, got {len(tokens)}")
    windows = np.stack([tokens[k * T : k * T + T + 1] for k in range(W)]).astype(np.int64)
    total = 0.0
    for b in range(0, W, batch):
        chunk = windows[b : b + batch]
        logits = model.forward(chunk[:, :-1])
        m = logits.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]
        tgt = np.take_along_axis(logits, chunk[:, 1:, None], axis=-1)[..., 0]
        total += float((logz - tgt).sum())
    loss = total / (W * T)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": W * T, "windows": W}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["logits", "eval", "greedy"])
    ap.add_argument("dir")
    ap.add_argument("--ids", help="comma-separated prompt token ids (logits, greedy)")
    ap.add_argument("--n", type=int, default=32, help="tokens to generate (greedy)")
    ap.add_argument("--tokens", help="binary token file (eval)")
    ap.add_argument("--dtype", choices=["u16", "u32"], default="u16")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int, default=0, help="windows per forward (0: auto)")
    args = ap.parse_args()
    model = Llama(args.dir)
    if args.cmd == "eval":
        if not (args.tokens and args.seq_len):
            ap.error("eval needs --tokens and --seq-len")
        tokens = np.fromfile(args.tokens, dtype={"u16": "<u2", "u32": "<u4"}[args.dtype])
        vocab = model.w["lm_head.weight"].shape[0]
        batch = args.batch or max(1, (1 << 24) // (args.seq_len * vocab))  # ~128 MiB of logits
        out = evaluate(model, tokens, args.seq_len, batch)
    else:
        if not args.ids:
            ap.error(f"{args.cmd} needs --ids")
        ids = [int(t) for t in args.ids.split(",")]
        if args.cmd == "logits":
            out = {"logits": model.forward(np.array([ids]))[0].tolist()}
        else:
            gen = []
            for _ in range(args.n):
                nxt = int(np.argmax(model.forward(np.array([ids + gen]))[0, -1]))  # first max on ties
                gen.append(nxt)
            out = {"ids": gen}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
