//! The GGUF format of llama.cpp (also read by Ollama and LM Studio), both ways, and the one
//! place that knows its tensor names and its RoPE layout.
//!
//! * Export (`lors-lm export --format gguf`, [`write_gguf`]): a model → one `.gguf` file with
//!   the `llama` architecture's metadata, the tokenizer embedded and the weights (LORS terms
//!   merged) in f32, f16 or q8_0, written through candle's GGUF writer.
//! * Import (`--gguf FILE`, [`load_gguf`]): a GGUF Llama (f32, f16, bf16, q8_0, q4_0, q4_1,
//!   q5_0, q5_1 or a k-quant) → a vanilla lors-lm model in f32 (dequantized through candle)
//!   with its tokenizer rebuilt from the metadata.
//!
//! **RoPE layout.** lors-lm (like Hugging Face) rotates the pairs `(x_i, x_{i + hd/2})` of
//! each head ("rotate half"); llama.cpp's llama architecture rotates adjacent pairs
//! `(x_{2i}, x_{2i+1})`. So the rows of the q and k weights are permuted within each head on
//! export ([`permute_rope`], llama.cpp's `LlamaModel.permute` in `convert_hf_to_gguf.py`) and
//! back on import ([`unpermute_rope`]): row `s·hd/2 + i` (half s ∈ {0, 1}) becomes row
//! `2i + s`. Then rotating adjacent pairs of the permuted projection is the permuted
//! rotate-half of the original one, and every attention score `q·k` is unchanged.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | tensor names, the RoPE permutation |
//! | `export.rs` | [`write_gguf`]: metadata, tensors, the file |
//! | `import.rs` | [`load_gguf`]: checks (magic, sizes, architecture, types), config, weights |
//! | `tokenizer.rs` | the `tokenizer.ggml.*` metadata of a byte-level BPE tokenizer, both ways |

mod export;
mod import;
mod tokenizer;

pub use export::{write_gguf, GgufDtype, GgufInfo};
pub use import::{load_gguf, load_gguf_tokenizer, names_gguf, GgufModel};

use crate::model::Proj;
use anyhow::{Context, Result};
use candle_core::Tensor;

/// llama.cpp's name of a projection inside block `blk.N.`.
fn proj_name(p: Proj) -> &'static str {
    match p {
        Proj::Q => "attn_q",
        Proj::K => "attn_k",
        Proj::V => "attn_v",
        Proj::O => "attn_output",
        Proj::Gate => "ffn_gate",
        Proj::Up => "ffn_up",
        Proj::Down => "ffn_down",
    }
}

/// The GGUF (llama.cpp `llama` architecture) name of one of our vanilla tensor names
/// (`Model::merged_tensors`).
pub fn gguf_name(ours: &str) -> Result<String> {
    match ours {
        "embed.weight" => return Ok("token_embd.weight".into()),
        "norm.weight" => return Ok("output_norm.weight".into()),
        "lm_head.weight" => return Ok("output.weight".into()),
        _ => {}
    }
    let parsed = ours.strip_prefix("layers.").and_then(|r| r.split_once('.')).and_then(|(layer, rest)| {
        let name = match rest {
            "attn_norm.weight" | "ffn_norm.weight" => rest.to_string(),
            _ => format!("{}.weight", proj_name(Proj::from_name(rest.strip_suffix(".weight")?)?)),
        };
        Some(format!("blk.{layer}.{name}"))
    });
    parsed.with_context(|| format!("{ours} has no GGUF name"))
}

/// Our vanilla parameter name of a GGUF tensor name (None for tensors a plain Llama does not
/// have: biases, MoE experts, RoPE frequency factors, ...).
pub fn name_from_gguf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("embed.weight".into()),
        "output_norm.weight" => return Some("norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (digits, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    // Only the canonical form (`blk.0.`, `blk.12.`): `blk.00.` or `blk.+0.` would otherwise
    // name the same layer twice.
    let layer: usize = digits.parse().ok().filter(|l: &usize| l.to_string() == digits)?;
    let ours = match rest {
        "attn_norm.weight" | "ffn_norm.weight" => rest.to_string(),
        _ => {
            let p = Proj::ALL.into_iter().find(|&p| rest.strip_suffix(".weight") == Some(proj_name(p)))?;
            format!("{p}.weight")
        }
    };
    Some(format!("layers.{layer}.{ours}"))
}

/// Rotate-half rows → llama.cpp's interleaved rows, per head: `w` (n_head·hd, in) viewed as
/// (n_head, 2, hd/2, in), halves and pair index swapped: `(n_head, hd/2, 2, in)`.
pub fn permute_rope(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, 2, half, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// The inverse of [`permute_rope`]: llama.cpp's interleaved rows → rotate-half rows.
pub fn unpermute_rope(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn names_round_trip_for_every_tensor_of_a_model() {
        let mut ours = vec!["embed.weight".to_string(), "norm.weight".into(), "lm_head.weight".into()];
        for l in [0, 7, 29] {
            ours.push(format!("layers.{l}.attn_norm.weight"));
            ours.push(format!("layers.{l}.ffn_norm.weight"));
            ours.extend(Proj::ALL.iter().map(|p| format!("layers.{l}.{p}.weight")));
        }
        for name in &ours {
            let g = gguf_name(name).unwrap();
            assert_eq!(name_from_gguf(&g).as_deref(), Some(name.as_str()), "{name} -> {g}");
        }
        assert_eq!(gguf_name("layers.3.o.weight").unwrap(), "blk.3.attn_output.weight");
        assert_eq!(gguf_name("layers.0.down.weight").unwrap(), "blk.0.ffn_down.weight");
        for other in [
            "blk.0.attn_q.bias",
            "blk.1.ffn_gate_inp.weight",
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.00.attn_q.weight",
            "blk.+0.attn_q.weight",
            "blk.01.ffn_up.weight",
            "blk. 1.ffn_up.weight",
        ] {
            assert_eq!(name_from_gguf(other), None, "{other}");
        }
        assert!(gguf_name("layers.0.lors_a").is_err());
    }

    /// rotate-half RoPE on rows [x_0..x_{hd/2}) and [x_{hd/2}..x_hd) of each head, as lors-lm
    /// applies it; x: (n_head·hd,) at position `pos`.
    fn rope_half(x: &[f32], n_head: usize, pos: f32, theta: f32) -> Vec<f32> {
        let hd = x.len() / n_head;
        let mut y = x.to_vec();
        for h in 0..n_head {
            for i in 0..hd / 2 {
                let a = pos * theta.powf(-2.0 * i as f32 / hd as f32);
                let (x0, x1) = (x[h * hd + i], x[h * hd + i + hd / 2]);
                y[h * hd + i] = x0 * a.cos() - x1 * a.sin();
                y[h * hd + i + hd / 2] = x0 * a.sin() + x1 * a.cos();
            }
        }
        y
    }

    /// llama.cpp's LLAMA_ROPE_TYPE_NORM: adjacent pairs (x_{2i}, x_{2i+1}) of each head.
    fn rope_adjacent(x: &[f32], n_head: usize, pos: f32, theta: f32) -> Vec<f32> {
        let hd = x.len() / n_head;
        let mut y = x.to_vec();
        for h in 0..n_head {
            for i in 0..hd / 2 {
                let a = pos * theta.powf(-2.0 * i as f32 / hd as f32);
                let (x0, x1) = (x[h * hd + 2 * i], x[h * hd + 2 * i + 1]);
                y[h * hd + 2 * i] = x0 * a.cos() - x1 * a.sin();
                y[h * hd + 2 * i + 1] = x0 * a.sin() + x1 * a.cos();
            }
        }
        y
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The permutation is what makes llama.cpp's adjacent-pair RoPE compute lors-lm's
    /// rotate-half attention scores: for random W_q, W_k (GQA: 4 query, 2 key heads) and
    /// inputs at two positions, RoPE_adjacent(P W x) = P RoPE_half(W x), so every per-head
    /// q·k is the same. Without the permutation the scores differ.
    #[test]
    fn permuted_weights_under_adjacent_rope_give_the_rotate_half_scores() -> Result<()> {
        let dev = Device::Cpu;
        let (d, hd, nh, nkv, theta) = (16, 8, 4, 2, 10000f32);
        let wq = Tensor::randn(0f32, 1.0, (nh * hd, d), &dev)?;
        let wk = Tensor::randn(0f32, 1.0, (nkv * hd, d), &dev)?;
        let (xq, xk) = (Tensor::randn(0f32, 1.0, (d, 1), &dev)?, Tensor::randn(0f32, 1.0, (d, 1), &dev)?);
        let proj = |w: &Tensor, x: &Tensor| -> Result<Vec<f32>> { Ok(w.matmul(x)?.flatten_all()?.to_vec1()?) };
        let (pq, pk) = (permute_rope(&wq, nh)?, permute_rope(&wk, nkv)?);
        let (tq, tk) = (3.0, 11.0);
        let ours_q = rope_half(&proj(&wq, &xq)?, nh, tq, theta);
        let ours_k = rope_half(&proj(&wk, &xk)?, nkv, tk, theta);
        let theirs_q = rope_adjacent(&proj(&pq, &xq)?, nh, tq, theta);
        let theirs_k = rope_adjacent(&proj(&pk, &xk)?, nkv, tk, theta);
        let wrong_q = rope_adjacent(&proj(&wq, &xq)?, nh, tq, theta);
        let wrong_k = rope_adjacent(&proj(&wk, &xk)?, nkv, tk, theta);
        let mut worst_unpermuted = 0f32;
        for h in 0..nh {
            let kv = h / (nh / nkv);
            let (q, k) = (h * hd..(h + 1) * hd, kv * hd..(kv + 1) * hd);
            let ours = dot(&ours_q[q.clone()], &ours_k[k.clone()]);
            let theirs = dot(&theirs_q[q.clone()], &theirs_k[k.clone()]);
            assert!((ours - theirs).abs() < 1e-3 * ours.abs().max(1.0), "head {h}: {ours} vs {theirs}");
            worst_unpermuted = worst_unpermuted.max((ours - dot(&wrong_q[q], &wrong_k[k])).abs());
        }
        assert!(worst_unpermuted > 1e-2, "the test cannot tell the layouts apart");
        Ok(())
    }

    /// Row 2i+s of a permuted head is row s·hd/2+i of the original; unpermute inverts it;
    /// candle's own rope (rotate half) and rope_i (adjacent pairs) agree under it.
    #[test]
    fn permutation_moves_rows_as_llama_cpp_does_and_inverts() -> Result<()> {
        let dev = Device::Cpu;
        let (n_head, hd, cols) = (3, 8, 2);
        let w = Tensor::arange(0f32, (n_head * hd * cols) as f32, &dev)?.reshape((n_head * hd, cols))?;
        let p = permute_rope(&w, n_head)?;
        let (wv, pv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (w.to_vec2()?, p.to_vec2()?);
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    assert_eq!(pv[h * hd + 2 * i + s], wv[h * hd + s * hd / 2 + i]);
                }
            }
        }
        assert_eq!(unpermute_rope(&p, n_head)?.to_vec2::<f32>()?, wv);

        // candle's fused kernels: rope (rotate half) vs rope_i (interleaved), x (B, H, T, hd).
        let (t, theta) = (5, 10000f32);
        let x = Tensor::randn(0f32, 1.0, (1, n_head, t, hd), &dev)?;
        let inv: Vec<f32> = (0..hd / 2).map(|i| theta.powf(-2.0 * i as f32 / hd as f32)).collect();
        let pos = Tensor::arange(0f32, t as f32, &dev)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&Tensor::new(inv.as_slice(), &dev)?.unsqueeze(0)?)?; // (T, hd/2)
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let half = candle_nn::rotary_emb::rope(&x, &cos, &sin)?;
        // Permute the head dimension of x and of the result: x (B, H, T, hd) → rows of hd.
        let perm = |x: &Tensor| -> Result<Tensor> {
            let rows = x.transpose(2, 3)?.reshape((n_head * hd, t))?; // (H·hd, T)
            let p = permute_rope(&rows, n_head)?;
            Ok(p.reshape((1, n_head, hd, t))?.transpose(2, 3)?.contiguous()?)
        };
        let adjacent = candle_nn::rotary_emb::rope_i(&perm(&x)?, &cos, &sin)?;
        let diff = (perm(&half)? - adjacent)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "rope_i(P x) != P rope(x): {diff}");
        Ok(())
    }
}
