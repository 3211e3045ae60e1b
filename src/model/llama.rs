//! A Llama-architecture decoder-only LM (as Hugging Face `LlamaForCausalLM`) whose seven
//! projection types can be LORS-shared across layers (`model/lors.rs`).
//!
//! ```text
//! embed → L × [x + Attention(RMSNorm(x)); x + Mlp(RMSNorm(x))] → RMSNorm → LM head
//! Attention: [q | k | v] = x [Wq; Wk; Wv]ᵀ → RoPE on q, k → causal softmax(q kᵀ/√hd) v → o
//! Mlp (SwiGLU): [g | u] = x [Wgate; Wup]ᵀ → down(silu(g) · u)
//! ```
//! The LM head is tied to the embedding by default. Every projection is a [`LorsLinear`]; the
//! projections that read the same input run as one matmul against their stacked weights.
//! Which implementation of RMSNorm, RoPE, attention, SwiGLU, the LORS merge and the loss runs
//! (fused CPU kernels or plain candle ops) is one value, [`Ops`]; the model has one code path.
//!
//! Parameter names (checkpoints): `embed.weight` (V, d); `layers.{l}.{attn,ffn}_norm.weight`
//! (d); the projections as `model/lors.rs` names them (`shared.{g}.{p}.weight` or
//! `layers.{l}.{p}.weight`, `layers.{l}.{p}.lors_{a,b}`); `norm.weight` (d);
//! `lm_head.weight` (V, d) when untied.

use crate::model::config::ModelConfig;
use crate::model::lors::{LorsConfig, LorsLinear, Proj};
use crate::model::ops::{linear_as, Ops};
use crate::model::stack::{linear_detached, BaseCache, Stack, WeightBytes, Weights};
use crate::model::store::{Init, ParamStore, Role};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, TensorId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// RoPE tables and what every block of one forward pass shares
// ---------------------------------------------------------------------------------------------

/// Rotary position embedding tables, HF "rotate_half" convention: the first and second
/// halves of each head form the rotated pairs.
///
/// The tables cover the positions used so far, not `max_seq_len`: they are built on first use
/// and grown (to the next power of two, at most `max_seq_len`) when a longer sequence comes.
/// A 1M-context model that generates a few tokens builds tables for a few positions, and a
/// file's `context_length` never sizes an allocation before its weights are read. The model's
/// clones share the tables.
#[derive(Debug, Clone)]
struct Rope {
    head_dim: usize,
    theta: f64,
    max_positions: usize,
    dtype: DType,
    device: Device,
    /// (positions, head_dim): cos/sin of position·θ_i, each frequency twice (both halves).
    tables: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

/// The most RoPE table elements (positions × head_dim) built, whatever the config says.
const MAX_ROPE_ELEMENTS: usize = 1 << 30;

impl Rope {
    fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Self {
        Self {
            head_dim: cfg.head_dim(),
            theta: cfg.rope_theta,
            max_positions: cfg.max_seq_len,
            dtype,
            device: device.clone(),
            tables: Arc::new(Mutex::new(None)),
        }
    }

    /// cos and sin tables covering at least positions 0..n (`n` <= `max_positions`).
    fn tables(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let mut guard = self.tables.lock().map_err(|_| anyhow::anyhow!("the RoPE tables' lock is poisoned"))?;
        if let Some((cos, sin)) = guard.as_ref().filter(|(cos, _)| cos.dim(0).is_ok_and(|have| have >= n)) {
            return Ok((cos.clone(), sin.clone()));
        }
        let rows = n.max(64).next_power_of_two().min(self.max_positions).max(n);
        let (cos, sin) = self.build(rows)?;
        *guard = Some((cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    fn build(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.head_dim;
        if n.checked_mul(hd).is_none_or(|e| e > MAX_ROPE_ELEMENTS) {
            bail!("RoPE tables for {n} positions × head_dim {hd} exceed {MAX_ROPE_ELEMENTS} elements: use shorter sequences");
        }
        let half = hd / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let angle = |pos: usize, j: usize| pos as f64 * inv_freq[j % half];
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f64> = (0..n).flat_map(|pos| (0..hd).map(move |j| f(angle(pos, j)))).collect();
            Ok(Tensor::from_vec(v, (n, hd), &Device::Cpu)?.to_dtype(self.dtype)?.to_device(&self.device)?)
        };
        Ok((table(f64::cos)?, table(f64::sin)?))
    }
}

/// What every block of one forward pass shares.
struct Pass {
    /// RoPE cos/sin tables covering at least the pass's positions.
    rope: (Tensor, Tensor),
    /// Position of the first token.
    offset: usize,
    /// dtype of the matmuls.
    mm: DType,
    ops: Ops,
    eps: f64,
}

impl Pass {
    fn rope(&self) -> (&Tensor, &Tensor) {
        (&self.rope.0, &self.rope.1)
    }
}

/// Per-layer key/value cache for generation: (k, v), each (B, H_kv, T_past, hd).
pub type KvCache = Vec<Option<(Tensor, Tensor)>>;

/// Sees the input (B, T, in) of the projections `projs` of one block, in forward order:
/// [q, k, v], [o], [gate, up], [down] ([`Model::visit_inputs`], activation-aware compression).
pub type InputTap<'a, 'b> = &'a mut (dyn FnMut(&[Proj], &Tensor) -> Result<()> + 'b);

/// An [`InputTap`] for the whole model: also told the layer.
pub type LayerInputTap<'a, 'b> = &'a mut (dyn FnMut(usize, &[Proj], &Tensor) -> Result<()> + 'b);

// ---------------------------------------------------------------------------------------------
// Stacked projections, attention, MLP, block
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Attention {
    qkv: Stack,
    o: Stack,
    /// (H, Hkv): query heads and key/value heads.
    heads: (usize, usize),
    head_dim: usize,
}

impl Attention {
    /// x: (B, T, d), the normed residual stream at positions offset..offset+T → (B, T, d).
    fn forward(
        &self,
        x: &Tensor,
        p: &Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mut tap: Option<InputTap<'_, '_>>,
    ) -> Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if let Some(tap) = tap.as_deref_mut() {
            tap(&[Proj::Q, Proj::K, Proj::V], x)?;
        }
        let qkv = self.qkv.forward(x, p.ops, p.mm)?; // (B, T, (H + 2·Hkv)·hd)
        let y = match cache {
            // Training and evaluation: RoPE and attention in one op on the packed projections.
            None => p.ops.attention_qkv(&qkv, p.rope(), p.offset, self.heads, scale, p.mm)?, // (B, T, H·hd)
            // Decoding: the keys and values of earlier positions come from the cache.
            Some(slot) => {
                let (q, mut k, mut v) = p.ops.split_qkv(&qkv, p.rope(), p.offset, self.heads)?; // (B, H|Hkv, T, hd)
                if let Some((past_k, past_v)) = slot.as_ref() {
                    k = Tensor::cat(&[past_k, &k], 2)?; // (B, Hkv, T_past + T, hd)
                    v = Tensor::cat(&[past_v, &v], 2)?;
                }
                *slot = Some((k.clone(), v.clone()));
                p.ops.attention(&q, &k, &v, scale, p.mm)? // (B, T, H·hd)
            }
        };
        if let Some(tap) = tap {
            tap(&[Proj::O], &y)?;
        }
        self.o.forward(&y, p.ops, p.mm)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: Stack,
    down: Stack,
}

impl Mlp {
    /// SwiGLU: x (B, T, d) → down(silu(x Wgateᵀ) · x Wupᵀ) (B, T, d).
    fn forward(&self, x: &Tensor, p: &Pass, mut tap: Option<InputTap<'_, '_>>) -> Result<Tensor> {
        if let Some(tap) = tap.as_deref_mut() {
            tap(&[Proj::Gate, Proj::Up], x)?;
        }
        let h = p.ops.swiglu_packed(&self.gate_up.forward(x, p.ops, p.mm)?)?; // (B, T, 2·F) -> (B, T, F)
        if let Some(tap) = tap {
            tap(&[Proj::Down], &h)?;
        }
        self.down.forward(&h, p.ops, p.mm)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn new(store: &mut ParamStore, lors: &LorsConfig, m: &ModelConfig, layer: usize) -> Result<Self> {
        let d = m.d_model;
        let mut gain = |name: &str| store.get(&format!("layers.{layer}.{name}.weight"), &[d], Init::Ones, Role::Gain);
        let (attn_norm, ffn_norm) = (gain("attn_norm")?, gain("ffn_norm")?);
        let attn = Attention {
            qkv: Stack::new(store, lors, m, layer, &[Proj::Q, Proj::K, Proj::V])?,
            o: Stack::new(store, lors, m, layer, &[Proj::O])?,
            heads: (m.n_heads, m.kv_heads()),
            head_dim: m.head_dim(),
        };
        let mlp = Mlp {
            gate_up: Stack::new(store, lors, m, layer, &[Proj::Gate, Proj::Up])?,
            down: Stack::new(store, lors, m, layer, &[Proj::Down])?,
        };
        Ok(Self { attn_norm, attn, ffn_norm, mlp })
    }

    /// x (B, T, d) → (B, T, d).
    fn forward(
        &self,
        x: &Tensor,
        p: &Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mut tap: Option<InputTap<'_, '_>>,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&p.ops.rms_norm(x, &self.attn_norm, p.eps)?, p, cache, tap.as_deref_mut())?)?;
        Ok((&x + self.mlp.forward(&p.ops.rms_norm(&x, &self.ffn_norm, p.eps)?, p, tap)?)?)
    }

    /// Its four stacks: [q, k, v], o, [gate, up], down.
    fn stacks(&self) -> [&Stack; 4] {
        [&self.attn.qkv, &self.attn.o, &self.mlp.gate_up, &self.mlp.down]
    }

    /// The training layer of `proj` (None once detached for inference).
    fn proj(&self, proj: Proj) -> Option<&LorsLinear> {
        self.stacks().into_iter().find_map(|s| s.part(proj))
    }

    /// The effective weight of `proj` (out, in).
    fn weight_of(&self, proj: Proj) -> Result<Tensor> {
        for s in self.stacks() {
            if let Some(w) = s.weight_of(proj)? {
                return Ok(w);
            }
        }
        bail!("projection {proj} missing from its block")
    }

    fn detached(&self, w: Weights, shared: &HashSet<TensorId>, cache: &mut BaseCache) -> Result<Self> {
        let mut d = |s: &Stack| s.detached(w, shared, cache);
        let attn = Attention { qkv: d(&self.attn.qkv)?, o: d(&self.attn.o)?, ..self.attn.clone() };
        let mlp = Mlp { gate_up: d(&self.mlp.gate_up)?, down: d(&self.mlp.down)? };
        Ok(Self { attn_norm: self.attn_norm.detach(), attn, ffn_norm: self.ffn_norm.detach(), mlp })
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    rope: Rope,
    /// dtype of the matmuls (F32, or BF16 for mixed precision); everything else is f32.
    matmul_dtype: DType,
    ops: Ops,
    /// None: trainable; else detached for inference with its weights kept this way.
    weights: Option<Weights>,
}

impl Model {
    /// Build the model, creating or loading every parameter through `store`.
    /// `m.vocab_size` must be resolved (> 0).
    pub fn new(m: &ModelConfig, lors: &LorsConfig, store: &mut ParamStore) -> Result<Self> {
        if m.vocab_size == 0 {
            bail!("model.vocab_size is 0: resolve it from the data before building the model");
        }
        let (v, d) = (m.vocab_size, m.d_model);
        let embed = store.get("embed.weight", &[v, d], Init::Normal(0.02), Role::Matrix)?;
        let layers = (0..m.n_layers).map(|l| Block::new(store, lors, m, l)).collect::<Result<Vec<_>>>()?;
        let norm = store.get("norm.weight", &[d], Init::Ones, Role::Gain)?;
        let lm_head = match m.tie_embeddings {
            true => None,
            false => Some(store.get("lm_head.weight", &[v, d], Init::Normal(0.02), Role::Matrix)?),
        };
        store.finish()?;
        let rope = Rope::new(m, store.dtype, &store.device);
        let ops = Ops::best_for(&embed);
        Ok(Self { cfg: m.clone(), embed, layers, norm, lm_head, rope, matmul_dtype: store.dtype, ops, weights: None })
    }

    /// A copy with every `W + B A` merged into one weight (and q, k, v and gate, up stacked)
    /// and detached from the graph: inference then costs exactly what a vanilla model's does.
    pub fn merged(&self) -> Result<Self> {
        self.clone().into_weights(Weights::Merged)
    }

    /// A copy detached from the graph that keeps the shared bases and private factors as they
    /// are (`model/stack.rs`): the unique parameters only, every projection computed as
    /// `x·W_sharedᵀ + s·(x·Aᵀ)·Bᵀ`.
    pub fn factored(&self) -> Result<Self> {
        self.clone().into_weights(Weights::Factored)
    }

    /// `merged` or `factored`, consuming the trainable model layer by layer, so that each
    /// layer's training tensors can be freed (when nothing else holds them) before the next
    /// is converted: peak memory stays near the larger of the two forms.
    pub fn into_weights(self, w: Weights) -> Result<Self> {
        if let Some(have) = self.weights {
            bail!("the model is already detached for inference ({} weights)", have.name());
        }
        let mut uses: HashMap<TensorId, usize> = HashMap::new();
        for id in self.layers.iter().flat_map(|b| b.stacks().into_iter().flat_map(|s| s.base_ids())) {
            *uses.entry(id).or_default() += 1;
        }
        let shared: HashSet<TensorId> = uses.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).collect();
        let mut cache = BaseCache::new();
        let Self { cfg, embed, layers, norm, lm_head, rope, matmul_dtype, ops, .. } = self;
        let mut out = Vec::with_capacity(layers.len());
        for block in layers {
            out.push(block.detached(w, &shared, &mut cache)?); // the training block drops here
        }
        Ok(Self {
            cfg,
            embed: embed.detach(),
            layers: out,
            norm: norm.detach(),
            lm_head: lm_head.map(|t| t.detach()),
            rope,
            matmul_dtype,
            ops,
            weights: Some(w),
        })
    }

    /// How the weights are kept: None while trainable.
    pub fn weights(&self) -> Option<Weights> {
        self.weights
    }

    /// Weight bytes one decoding step reads (every projection and the LM head; the embedding
    /// contributes one row) and how many distinct bytes those are, were the model kept as `w`.
    pub fn weight_bytes(&self, w: Weights) -> WeightBytes {
        let mut seen = HashSet::new();
        let (mut read, mut distinct) = (0u64, 0u64);
        for s in self.layers.iter().flat_map(|b| b.stacks()) {
            let (r, d) = s.elements(w, &mut seen);
            (read, distinct) = (read + r, distinct + d);
        }
        let (v, d, l) = (self.cfg.vocab_size as u64, self.cfg.d_model as u64, self.cfg.n_layers as u64);
        let head = v * d;
        let other = (2 * l + 1) * d + if self.lm_head.is_some() { head } else { 0 }; // gains, untied head
        let size = self.embed.dtype().size_in_bytes() as u64;
        WeightBytes { read: (read + head + other) * size, distinct: (distinct + head + other) * size }
    }

    /// Run on the given implementation of the operations (benchmarks and tests compare them).
    /// Errors if the fused kernels are asked for where they cannot run.
    pub fn with_ops(mut self, ops: Ops) -> Result<Self> {
        self.set_ops(ops)?;
        Ok(self)
    }

    /// `with_ops` in place.
    pub fn set_ops(&mut self, ops: Ops) -> Result<()> {
        self.ops = ops.check(&self.embed)?;
        Ok(())
    }

    pub fn ops(&self) -> Ops {
        self.ops
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

    /// ids (B, T) at positions offset..offset+T → logits (B, T, V), optionally reading and
    /// extending a KV cache.
    pub fn forward_at(&self, ids: &Tensor, offset: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let x = self.hidden_at(ids, offset, cache, None)?;
        match self.weights {
            Some(_) => linear_detached(&x, self.head(), self.ops, self.matmul_dtype), // (B, T, d) -> (B, T, V)
            None => linear_as(&x, self.head(), self.matmul_dtype),
        }
    }

    /// The LM head (V, d): the embedding when tied.
    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final-normed hidden states (B, T, d) that the LM head reads.
    /// `tap` sees every projection's input, with its layer.
    fn hidden_at(
        &self,
        ids: &Tensor,
        offset: usize,
        mut cache: Option<&mut KvCache>,
        mut tap: Option<LayerInputTap<'_, '_>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if offset + t > self.cfg.max_seq_len {
            bail!("sequence of {} tokens exceeds model.max_seq_len ({})", offset + t, self.cfg.max_seq_len);
        }
        let p = Pass {
            rope: self.rope.tables(offset + t)?,
            offset,
            mm: self.matmul_dtype,
            ops: self.ops,
            eps: self.cfg.norm_eps,
        };
        let mut x = self.embed.embedding(&ids.flatten_all()?)?.reshape((b, t, self.cfg.d_model))?; // (B, T, d)
        for (l, block) in self.layers.iter().enumerate() {
            let mut layer_tap = tap.as_deref_mut().map(|t| move |projs: &[Proj], x: &Tensor| t(l, projs, x));
            let layer_tap = layer_tap.as_mut().map(|t| t as InputTap);
            x = block.forward(&x, &p, cache.as_deref_mut().map(|c| &mut c[l]), layer_tap)?;
        }
        self.ops.rms_norm(&x, &self.norm, self.cfg.norm_eps)
    }

    /// Runs ids (B, T) through the blocks, showing `tap` the input (B, T, in) of every
    /// projection with its layer (the calibration pass of activation-aware compression).
    pub fn visit_inputs(&self, ids: &Tensor, tap: LayerInputTap<'_, '_>) -> Result<()> {
        self.hidden_at(ids, 0, None, Some(tap)).map(|_| ())
    }

    /// Mean next-token loss of ids (B, T) against targets (B, T): what training minimises.
    /// The fused kernels run the LM head and the loss as one op that never stores the logits.
    pub fn forward_loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let x = self.hidden_at(ids, 0, None, None)?;
        let (b, t, d) = x.dims3()?;
        // (B, T, d) -> (B·T, d); targets (B, T) -> (B·T)
        self.ops.linear_cross_entropy(&x.reshape((b * t, d))?, self.head(), &targets.reshape(b * t)?, self.matmul_dtype)
    }

    /// Mean next-token cross-entropy of `logits` (B, T, V) against `targets` (B, T): the fused
    /// kernel where it can run (CPU, f32/f64), candle's composition elsewhere.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Self::loss_with(Ops::best_for(logits), logits, targets)
    }

    /// `loss` on the given implementation.
    pub fn loss_with(ops: Ops, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        ops.cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
        // (B·T, V), (B·T)
    }

    /// For each layer and projection with a private residual: `‖B_l A_l‖_F / ‖W_shared‖_F`.
    pub fn residual_ratios(&self) -> Result<Vec<(usize, Proj, f32)>> {
        let mut out = vec![];
        for (l, block) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(lin) = block.proj(p).filter(|lin| lin.rank() > 0 && lin.has_base()) {
                    out.push((l, p, lin.residual_ratio()?));
                }
            }
        }
        Ok(out)
    }

    /// The effective (merged) weight `W_shared + B_l A_l` of projection `proj` in `layer`.
    pub fn effective_weight(&self, layer: usize, proj: Proj) -> Result<Tensor> {
        let block = self.layers.get(layer).ok_or_else(|| anyhow::anyhow!("no layer {layer}"))?;
        block.weight_of(proj)
    }

    /// Every weight under the name a vanilla model gives it (`embed.weight`,
    /// `layers.{l}.{p}.weight`, ...), LORS terms merged, detached: the model as a plain Llama
    /// (exports and compression start from this).
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("embed.weight".to_string(), self.embed.detach())];
        for (l, block) in self.layers.iter().enumerate() {
            out.push((format!("layers.{l}.attn_norm.weight"), block.attn_norm.detach()));
            out.push((format!("layers.{l}.ffn_norm.weight"), block.ffn_norm.detach()));
            for p in Proj::ALL {
                out.push((format!("layers.{l}.{p}.weight"), block.weight_of(p)?.detach()));
            }
        }
        out.push(("norm.weight".to_string(), self.norm.detach()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.detach()));
        }
        Ok(out)
    }
}
