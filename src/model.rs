//! A Llama-architecture decoder-only LM (as Hugging Face `LlamaForCausalLM`) whose seven
//! projection types can be LORS-shared across layers.
//!
//! embed → L × [RMSNorm → causal self-attention with RoPE → residual;
//!              RMSNorm → SwiGLU `down(silu(gate(x)) * up(x))` → residual]
//!       → RMSNorm → LM head (tied to the embedding by default).
//!
//! On the CPU (f32/f64) RMSNorm, RoPE, attention, SwiGLU, the LORS merge and the LM head +
//! loss run as our own fused kernels with hand-written backward passes (`ops.rs`), and in
//! training the q, k, v projections run as one matmul (as do gate and up); elsewhere,
//! and with `with_fused_ops(false)`, every op is a differentiable composition of basic candle
//! ops.
//! (candle's own fused `softmax_last_dim`, `rms_norm` and `rope` build no backward op and
//! would silently stop the gradient; see shared/CANDLE_NOTES.md.)
//!
//! Parameter names (checkpoints):
//! `embed.weight` (V, d); `layers.{l}.{attn,ffn}_norm.weight` (d);
//! a shared base `shared.{g}.{p}.weight` (out, in) for group g, or a private
//! `layers.{l}.{p}.weight`; LORS factors `layers.{l}.{p}.lors_a` (r, in) and
//! `layers.{l}.{p}.lors_b` (out, r); `norm.weight` (d); `lm_head.weight` (V, d) when untied.

use crate::config::{Config, ModelConfig};
use crate::lors::{linear_as, LorsLinear, Private};
use crate::ops;
use crate::store::{Init, ParamStore};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// RMSNorm `x / sqrt(mean(x²) + eps) * g` over the last dim (fused kernel when `fused`).
fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if fused {
        return Ok(ops::rms_norm(x, gain, eps)?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(gain)?)
}

/// `a.matmul(b)` computed in `dtype`, returned in a's dtype (mixed precision).
fn matmul_as(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if a.dtype() == dtype {
        return Ok(a.matmul(b)?);
    }
    Ok(a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?.to_dtype(a.dtype())?)
}

/// Softmax over the last dim. The max is detached: softmax does not depend on it, so its
/// gradient contribution is exactly zero and need not be built.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Rotary position embedding tables, HF "rotate_half" convention: the first and second
/// halves of each head form the rotated pairs.
struct Rope {
    /// (max_seq_len, head_dim): cos/sin of position·θ_i, each frequency twice (both halves).
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let half = hd / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let n = cfg.max_seq_len;
        let (mut cos, mut sin) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
        for pos in 0..n {
            for j in 0..hd {
                let angle = pos as f64 * inv_freq[j % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, hd), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(Self { cos: mk(cos)?, sin: mk(sin)? })
    }

    /// x: (B, T, H, hd) at positions offset..offset+T → rotated (B, H, T, hd), contiguous.
    fn apply_t(&self, x: &Tensor, offset: usize, fused: bool) -> Result<Tensor> {
        if fused {
            return Ok(ops::rope_t(x, &self.cos, &self.sin, offset)?);
        }
        self.apply(&x.transpose(1, 2)?.contiguous()?, offset)
    }

    /// x: (B, H, T, hd) at positions offset..offset+T.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?; // (T, hd)
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // rotate_half(x)
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// What every block of one forward pass shares.
#[derive(Clone, Copy)]
struct Pass<'a> {
    cfg: &'a ModelConfig,
    rope: &'a Rope,
    /// Additive causal mask (T, S), None when T = 1.
    mask: Option<&'a Tensor>,
    /// dtype of the matmuls.
    mm: DType,
    /// Use the fused CPU kernels of `ops.rs`.
    fused: bool,
}

/// Per-layer key/value cache for generation: (k, v), each (B, H_kv, T_past, hd).
pub type KvCache = Vec<Option<(Tensor, Tensor)>>;

struct Block {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    q: LorsLinear,
    k: LorsLinear,
    v: LorsLinear,
    o: LorsLinear,
    gate: LorsLinear,
    up: LorsLinear,
    down: LorsLinear,
}

impl Block {
    fn new(cfg: &Config, store: &mut ParamStore, layer: usize) -> Result<Self> {
        let m = &cfg.model;
        let d = m.d_model;
        let proj = |store: &mut ParamStore, p: &str| -> Result<LorsLinear> {
            let shape = m.proj_shape(p);
            let own = format!("layers.{layer}.{p}");
            let base = if cfg.lors.is_shared(p) {
                format!("shared.{}.{p}.weight", cfg.lors.group_of(layer, m.n_layers))
            } else {
                format!("{own}.weight")
            };
            let rank = cfg.lors.rank_for(p, layer);
            let private = (rank > 0).then_some(Private {
                prefix: &own,
                rank,
                init: cfg.lors.init,
                scale: cfg.lors.residual_scale(rank),
            });
            LorsLinear::new(store, &base, shape, private)
        };
        Ok(Self {
            attn_norm: store.get(&format!("layers.{layer}.attn_norm.weight"), &[d], Init::Ones)?,
            q: proj(store, "q")?,
            k: proj(store, "k")?,
            v: proj(store, "v")?,
            o: proj(store, "o")?,
            ffn_norm: store.get(&format!("layers.{layer}.ffn_norm.weight"), &[d], Init::Ones)?,
            gate: proj(store, "gate")?,
            up: proj(store, "up")?,
            down: proj(store, "down")?,
        })
    }

    fn projections(&self) -> [(&'static str, &LorsLinear); 7] {
        [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("o", &self.o),
            ("gate", &self.gate),
            ("up", &self.up),
            ("down", &self.down),
        ]
    }

    fn merged(&self) -> Result<Self> {
        Ok(Self {
            attn_norm: self.attn_norm.detach(),
            ffn_norm: self.ffn_norm.detach(),
            q: self.q.merged()?,
            k: self.k.merged()?,
            v: self.v.merged()?,
            o: self.o.merged()?,
            gate: self.gate.merged()?,
            up: self.up.merged()?,
            down: self.down.merged()?,
        })
    }

    /// Causal attention from basic candle ops: q (B, H, T, hd), k/v (B, Hkv, S, hd) →
    /// (B, H, T, hd), with the additive mask (None when T = 1).
    fn attention_plain(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
        mm: DType,
    ) -> Result<Tensor> {
        let (b, h, _, hd) = q.dims4()?;
        let (_, hkv, s, _) = k.dims4()?;
        let (k, v) = if h != hkv {
            // GQA: (B, Hkv, S, hd) -> (B, Hkv, rep, S, hd) -> (B, H, S, hd)
            let rep = h / hkv;
            let expand = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?.broadcast_as((b, hkv, rep, s, hd))?.reshape((b, h, s, hd))?)
            };
            (expand(k)?, expand(v)?)
        } else {
            (k.clone(), v.clone())
        };
        let att = (matmul_as(q, &k.t()?, mm)? * scale)?; // (B, H, T, S), f32
        let att = softmax_last(&match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        })?;
        matmul_as(&att, &v, mm) // (B, H, T, hd)
    }

    /// x: (B, T, d) at positions offset..offset+T → (B, T, d).
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Pass,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let Pass { cfg, rope, mask, mm, fused } = *ctx;
        let (b, t, d) = x.dims3()?;
        let (h, hkv, hd) = (cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        let scale = 1.0 / (hd as f64).sqrt();
        // Without a cache (training, evaluation) the fused kernels take q, k, v from one
        // matmul against the stacked weights [Wq; Wk; Wv], and gate, up from one against
        // [Wgate; Wup]: fewer, larger matmuls. Decoding keeps them apart (stacking the
        // weights for every token would cost more than it saves).
        let packed = fused && cache.is_none();
        let stacked = |ps: &[&LorsLinear]| -> Result<Tensor> {
            let ws = ps.iter().map(|p| p.weight_as(true)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&ws, 0)?)
        };

        // --- attention ---
        let xn = rms_norm(x, &self.attn_norm, cfg.norm_eps, fused)?;
        let y = if packed {
            // (B, T, (H + 2·Hkv)·hd) -> (B, T, d)
            let qkv = linear_as(&xn, &stacked(&[&self.q, &self.k, &self.v])?, mm)?;
            ops::attention_qkv(&qkv, &rope.cos, &rope.sin, offset, (h, hkv), scale)?
        } else {
            // (B, T, H*hd) -> (B, T, H, hd) -> (B, H, T, hd); q and k rotated on the way.
            let q = rope.apply_t(&self.q.forward_as(&xn, mm, fused)?.reshape((b, t, h, hd))?, offset, fused)?;
            let mut k = rope.apply_t(&self.k.forward_as(&xn, mm, fused)?.reshape((b, t, hkv, hd))?, offset, fused)?;
            let mut v = self.v.forward_as(&xn, mm, fused)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?;
            if let Some(slot) = cache {
                if let Some((pk, pv)) = slot.as_ref() {
                    k = Tensor::cat(&[pk, &k], 2)?; // (B, Hkv, T_past + T, hd)
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                *slot = Some((k.clone(), v.clone()));
            }
            if fused {
                // One fused kernel: scores, causal softmax and P·v per head, GQA included.
                ops::attention(&q, &k, &v, scale)?.reshape((b, t, d))? // (B, T, H, hd) -> (B, T, d)
            } else {
                self.attention_plain(&q, &k, &v, mask, scale, mm)?.transpose(1, 2)?.reshape((b, t, d))?
            }
        };
        let x = (x + self.o.forward_as(&y, mm, fused)?)?;

        // --- SwiGLU FFN ---
        let xn = rms_norm(&x, &self.ffn_norm, cfg.norm_eps, fused)?;
        let hdn = if packed {
            // (B, T, 2·ffn) -> (B, T, ffn)
            ops::swiglu_packed(&linear_as(&xn, &stacked(&[&self.gate, &self.up])?, mm)?)?
        } else {
            let (gate, up) = (self.gate.forward_as(&xn, mm, fused)?, self.up.forward_as(&xn, mm, fused)?);
            if fused {
                ops::swiglu(&gate, &up)?
            } else {
                (gate.silu()? * up)?
            }
        };
        Ok((x + self.down.forward_as(&hdn, mm, fused)?)?)
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    rope: Rope,
    /// dtype of the matmuls (F32, or BF16 for mixed precision); everything else is f32.
    matmul_dtype: DType,
    /// Run RMSNorm, RoPE, attention, SwiGLU, the LORS merge and the head + loss as fused
    /// kernels (CPU, f32/f64).
    fused: bool,
}

impl Model {
    /// Build the model, creating or loading every parameter through `store`.
    /// `cfg.model.vocab_size` must be resolved (> 0).
    pub fn new(cfg: &Config, store: &mut ParamStore) -> Result<Self> {
        let m = &cfg.model;
        if m.vocab_size == 0 {
            bail!("model.vocab_size is 0: resolve it from the data before building the model");
        }
        let (v, d) = (m.vocab_size, m.d_model);
        let embed = store.get("embed.weight", &[v, d], Init::Normal(0.02))?;
        let layers = (0..m.n_layers).map(|l| Block::new(cfg, store, l)).collect::<Result<Vec<_>>>()?;
        let norm = store.get("norm.weight", &[d], Init::Ones)?;
        let lm_head =
            if m.tie_embeddings { None } else { Some(store.get("lm_head.weight", &[v, d], Init::Normal(0.02))?) };
        store.finish()?;
        let rope = Rope::new(m, store.dtype, &store.device)?;
        let matmul_dtype = store.dtype;
        let fused = ops::supported(&embed);
        Ok(Self { cfg: m.clone(), embed, layers, norm, lm_head, rope, matmul_dtype, fused })
    }

    /// A copy with every `W + B A` merged into one weight and detached from the graph:
    /// generation then costs exactly what a vanilla model's does.
    pub fn merged(&self) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            embed: self.embed.detach(),
            layers: self.layers.iter().map(Block::merged).collect::<Result<Vec<_>>>()?,
            norm: self.norm.detach(),
            lm_head: self.lm_head.as_ref().map(|t| t.detach()),
            rope: Rope { cos: self.rope.cos.clone(), sin: self.rope.sin.clone() },
            matmul_dtype: self.matmul_dtype,
            fused: self.fused,
        })
    }

    /// Use (true, the default where they can run) or bypass the fused CPU kernels of `ops.rs`
    /// (benchmarks and tests compare the two). Errors if asked for where they cannot run.
    pub fn with_fused_ops(mut self, on: bool) -> Result<Self> {
        if on && !ops::supported(&self.embed) {
            bail!("the fused kernels run on the CPU in f32/f64 only");
        }
        self.fused = on;
        Ok(self)
    }

    /// Run the matmuls in `dtype` (BF16: mixed precision; the weights stay in their dtype).
    pub fn with_matmul_dtype(mut self, dtype: DType) -> Self {
        self.matmul_dtype = dtype;
        self
    }

    pub fn matmul_dtype(&self) -> DType {
        self.matmul_dtype
    }

    pub fn device(&self) -> Device {
        self.embed.device().clone()
    }

    pub fn new_cache(&self) -> KvCache {
        vec![None; self.layers.len()]
    }

    /// ids: (B, T) u32 → logits (B, T, V). Training and eval.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_at(ids, 0, None)
    }

    /// ids (B, T) at positions offset..offset+T, optionally reading and extending a KV cache.
    pub fn forward_at(&self, ids: &Tensor, offset: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let x = self.hidden_at(ids, offset, cache)?;
        linear_as(&x, self.head(), self.matmul_dtype) // (B, T, V)
    }

    /// The LM head (V, d): the embedding when tied.
    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final-normed hidden states (B, T, d) that the LM head reads.
    fn hidden_at(&self, ids: &Tensor, offset: usize, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if offset + t > self.cfg.max_seq_len {
            bail!("sequence of {} tokens exceeds model.max_seq_len ({})", offset + t, self.cfg.max_seq_len);
        }
        // The fused attention masks as it goes; only the plain path needs the mask tensor.
        let mask = if self.fused { None } else { causal_mask(t, offset, self.embed.dtype(), self.embed.device())? };
        let mut x = self.embed.embedding(&ids.flatten_all()?)?.reshape((b, t, self.cfg.d_model))?;
        let ctx =
            Pass { cfg: &self.cfg, rope: &self.rope, mask: mask.as_ref(), mm: self.matmul_dtype, fused: self.fused };
        for (l, block) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c[l]);
            x = block.forward(&x, &ctx, offset, slot)?;
        }
        rms_norm(&x, &self.norm, self.cfg.norm_eps, self.fused)
    }

    /// Mean next-token loss of ids (B, T) against targets (B, T): what training minimises.
    /// With the fused kernels the LM head and the loss run as one op
    /// (`ops::linear_cross_entropy`), which never stores the logits' gradient; otherwise
    /// `loss(forward(ids), targets)`.
    pub fn forward_loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if !self.fused || self.matmul_dtype != self.embed.dtype() {
            return Model::loss(&self.forward(ids)?, targets);
        }
        let x = self.hidden_at(ids, 0, None)?;
        let (b, t, d) = x.dims3()?;
        let loss = ops::linear_cross_entropy(&x.reshape((b * t, d))?, self.head(), &targets.reshape(b * t)?)?;
        Ok(loss.mean_all()?)
    }

    /// Mean next-token cross-entropy of `logits` (B, T, V) against `targets` (B, T); the fused
    /// kernel where it can run (CPU, f32/f64), candle's composition elsewhere.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        let logits = logits.reshape((b * t, v))?;
        let targets = targets.reshape(b * t)?;
        if !ops::supported(&logits) {
            return Ok(candle_nn::loss::cross_entropy(&logits, &targets)?);
        }
        Ok(ops::cross_entropy(&logits, &targets)?.mean_all()?)
    }

    /// `loss` through candle's own composition everywhere (benchmarks and tests compare).
    pub fn loss_plain(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        Ok(candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)?)
    }

    /// For each layer and projection type: `‖B_l A_l‖_F / ‖W_shared‖_F` (0 where there is
    /// no private residual).
    pub fn residual_ratios(&self) -> Result<Vec<(usize, &'static str, f32)>> {
        let mut out = vec![];
        for (l, block) in self.layers.iter().enumerate() {
            for (p, lin) in block.projections() {
                if lin.rank() > 0 {
                    out.push((l, p, lin.residual_ratio()?));
                }
            }
        }
        Ok(out)
    }

    /// Every weight under its Hugging Face `LlamaForCausalLM` name, LORS terms merged
    /// (`W_l = W_shared + B_l A_l`), detached: what `lors-lm export` writes.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.detach())];
        for (l, block) in self.layers.iter().enumerate() {
            let pre = format!("model.layers.{l}");
            out.push((format!("{pre}.input_layernorm.weight"), block.attn_norm.detach()));
            out.push((format!("{pre}.post_attention_layernorm.weight"), block.ffn_norm.detach()));
            for (p, lin) in block.projections() {
                let module = if crate::config::is_attn(p) { "self_attn" } else { "mlp" };
                out.push((format!("{pre}.{module}.{p}_proj.weight"), lin.weight()?.detach()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.detach()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.detach()));
        }
        Ok(out)
    }

    /// The effective (merged) weight of projection `proj` in `layer`.
    pub fn effective_weight(&self, layer: usize, proj: &str) -> Result<Tensor> {
        let block = &self.layers[layer];
        let lin = block
            .projections()
            .into_iter()
            .find(|(p, _)| *p == proj)
            .map(|(_, l)| l)
            .ok_or_else(|| anyhow::anyhow!("unknown projection {proj}"))?;
        lin.weight()
    }
}

/// Our parameter name of a vanilla model for a Hugging Face Llama tensor name (None for
/// tensors we do not use, such as old `rotary_emb.inv_freq` buffers).
pub fn name_from_hf(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("embed.weight".into()),
        "model.norm.weight" => return Some("norm.weight".into()),
        "lm_head.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let ours = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "post_attention_layernorm.weight" => "ffn_norm.weight".to_string(),
        _ => {
            let proj =
                rest.strip_prefix("self_attn.").or_else(|| rest.strip_prefix("mlp."))?.strip_suffix("_proj.weight")?;
            if !crate::config::PROJ_TYPES.contains(&proj) {
                return None;
            }
            format!("{proj}.weight")
        }
    };
    Some(format!("layers.{layer}.{ours}"))
}

/// Additive causal mask (T, offset+T): 0 where key j <= offset + i, -inf after. None for T=1.
fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = offset + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), device)?.to_dtype(dtype)?))
}
