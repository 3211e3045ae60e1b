#!/usr/bin/env python3
"""Golden logits for tests/golden.rs from Hugging Face transformers' LlamaForCausalLM.

Builds deterministic weights from a closed-form formula (mirrored in tests/golden.rs),
merges every LORS projection `W = base + B @ A`, loads the merged weights into
`LlamaForCausalLM` in float64, runs a fixed batch of token ids and prints the values
that tests/golden.rs pastes, as Rust `const` items.

Regenerate (not a test or CI dependency):
    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch transformers
    /tmp/golden-venv/bin/python scripts/golden_reference.py

float64 caveat: stock transformers computes RMSNorm, the RoPE angles and the eager softmax
in float32 even when the model is float64 (`.to(torch.float32)`, `dtype=torch.float`), which
would cap the agreement at ~1e-7. The three functions are patched below to run in the input
dtype, with the formulas unchanged; the script also runs the stock model and asserts it
agrees with the patched one to float32 accuracy, so the patches change precision only.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import transformers.models.llama.modeling_llama as ml
from transformers import LlamaConfig, LlamaForCausalLM

PROJ = ["q", "k", "v", "o", "gate", "up", "down"]
HF_NAME = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
IDS = [[3, 17, 42, 8, 60, 0, 25], [59, 1, 33, 33, 12, 47, 5]]
N_LOGITS = 5  # golden logits: the first N_LOGITS vocab entries at every position

CONFIGS = {
    # (a) LORS, GQA, tied head: layers 0-1 share group 0, layer 2 is group 1.
    "LORS": dict(lors=True, vocab=61, d=32, layers=3, heads=4, kv_heads=2, ffn=48,
                 rank=3, groups=2, tied=True, theta=10000.0, eps=1e-5),
    # (b) vanilla Llama, plain multi-head attention, untied head.
    "VANILLA": dict(lors=False, vocab=61, d=32, layers=3, heads=4, kv_heads=4, ffn=48,
                    rank=0, groups=1, tied=False, theta=500000.0, eps=1e-6),
}


def group_of(layer, n_layers, groups):
    """Mirror of LorsConfig::group_of: consecutive groups, earlier ones one larger."""
    base, extra = divmod(n_layers, groups)
    big = extra * (base + 1)
    return layer // (base + 1) if layer < big else extra + (layer - big) // max(base, 1)


def names_and_shapes(c):
    """Every parameter of the Rust model in a fixed order; k = index in this list."""
    d, f, kv = c["d"], c["ffn"], c["kv_heads"] * (c["d"] // c["heads"])
    shape = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d),
             "gate": (f, d), "up": (f, d), "down": (d, f)}
    out = [("embed.weight", (c["vocab"], d))]
    if c["lors"]:
        out += [(f"shared.{g}.{p}.weight", shape[p]) for g in range(c["groups"]) for p in PROJ]
    for l in range(c["layers"]):
        out += [(f"layers.{l}.attn_norm.weight", (d,)), (f"layers.{l}.ffn_norm.weight", (d,))]
        for p in PROJ:
            o, i = shape[p]
            if c["lors"]:
                out += [(f"layers.{l}.{p}.lors_a", (c["rank"], i)),
                        (f"layers.{l}.{p}.lors_b", (o, c["rank"]))]
            else:
                out.append((f"layers.{l}.{p}.weight", (o, i)))
    out.append(("norm.weight", (d,)))
    if not c["tied"]:
        out.append(("lm_head.weight", (c["vocab"], d)))
    return out


def tensor(name, shape, k):
    """Element i (row-major) of the k-th tensor: u = (h - 498) / 498 in [-1, 1] with the
    integer h = (31 i^2 + 17 i + 101 k + 7) mod 997 (a quadratic "chirp", so the matrices
    have full rank, unlike sin(a i + b)), times an amplitude that keeps activations O(1)."""
    n = math.prod(shape)
    i = np.arange(n, dtype=np.int64)
    u = ((31 * i * i + 17 * i + 101 * k + 7) % 997 - 498).astype(np.float64) / 498.0
    if name.endswith("norm.weight"):
        return (1.0 + 0.25 * u).reshape(shape)
    if name == "embed.weight":
        amp = 1.0
    elif name.endswith("lors_b"):
        amp = 1.0 / math.sqrt(shape[1])  # B non-zero: ||BA|| ~ 0.5 ||W||
    else:
        amp = 2.0 / math.sqrt(shape[1])  # (out, in) weights, lors_a, lm_head
    return (u * amp).reshape(shape)


# ---- float64-faithful versions of the three float32 spots in modeling_llama ----
def rms_norm_f64(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def rope_f64(self, x, position_ids):
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def eager_f64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key, value = ml.repeat_kv(key, module.num_key_value_groups), ml.repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def hf_logits(c, weights, ids, patched):
    hd = c["d"] // c["heads"]
    cfg = LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["d"], intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"], hidden_act="silu", max_position_embeddings=32,
        rms_norm_eps=c["eps"], rope_parameters={"rope_type": "default", "rope_theta": c["theta"]},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=c["tied"],
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).double().eval()
    sd = {"model.embed_tokens.weight": weights["embed.weight"], "model.norm.weight": weights["norm.weight"],
          "lm_head.weight": weights["embed.weight" if c["tied"] else "lm_head.weight"]}
    for l in range(c["layers"]):
        sd[f"model.layers.{l}.input_layernorm.weight"] = weights[f"layers.{l}.attn_norm.weight"]
        sd[f"model.layers.{l}.post_attention_layernorm.weight"] = weights[f"layers.{l}.ffn_norm.weight"]
        for p in PROJ:
            if c["lors"]:  # W = base + B @ A
                w = (weights[f"shared.{group_of(l, c['layers'], c['groups'])}.{p}.weight"]
                     + weights[f"layers.{l}.{p}.lors_b"] @ weights[f"layers.{l}.{p}.lors_a"])
            else:
                w = weights[f"layers.{l}.{p}.weight"]
            sd[f"model.layers.{l}.{HF_NAME[p]}.weight"] = w
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    if c["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = (ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, ml.eager_attention_forward)
    if patched:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, ml.eager_attention_forward = rms_norm_f64, rope_f64, eager_f64
        model.model.rotary_emb.inv_freq = 1.0 / (c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, ml.eager_attention_forward = saved


def rust_array(name, values, ty="f64"):
    body = ", ".join(repr(float(v)) for v in values)
    return f"#[rustfmt::skip]\nconst {name}: [{ty}; {len(values)}] = [{body}];"


def main():
    torch.set_num_threads(1)
    ids = torch.tensor(IDS, dtype=torch.long)
    print(f"// torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    for tag, c in CONFIGS.items():
        weights = {name: tensor(name, shape, k) for k, (name, shape) in enumerate(names_and_shapes(c))}
        logits = hf_logits(c, weights, ids, patched=True)  # (B, T, V) float64
        stock = hf_logits(c, weights, ids, patched=False)
        drift = (logits - stock).abs().max().item()
        assert drift < 1e-4 * logits.abs().max().item(), drift  # the patches change precision only
        # Mean next-token cross-entropy of ids[:, 1:] given ids[:, :-1], in float64.
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, c["vocab"]), ids[:, 1:].reshape(-1))
        print(f"// {tag}: max |logit| {logits.abs().max().item():.3f}, stock-transformers drift {drift:.2e}")
        print(rust_array(f"{tag}_FIRST", logits[..., :N_LOGITS].flatten().tolist()))
        print(rust_array(f"{tag}_SUM", logits.sum(-1).flatten().tolist()))
        print(rust_array(f"{tag}_SUMSQ", logits.pow(2).sum(-1).flatten().tolist()))
        print(f"const {tag}_LOSS: f64 = {loss.item()!r};")


if __name__ == "__main__":
    main()
