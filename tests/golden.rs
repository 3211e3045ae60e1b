//! Golden values from an independent reference: the model's logits (and loss) must match
//! Hugging Face transformers' `LlamaForCausalLM` run on the same weights in float64.
//!
//! `scripts/golden_reference.py` builds the weights below from the same closed-form
//! formula, merges every LORS projection `W = shared + B @ A` (numpy), loads the merged
//! weights into `LlamaForCausalLM(LlamaConfig(hidden_act="silu", attention_bias=False,
//! mlp_bias=False, tie_word_embeddings=..., attn_implementation="eager")).double()`, runs
//! `IDS` and prints the constants pasted at the end of this file. Its essence:
//!
//! ```python
//! weights = {name: tensor(name, shape, k) for k, (name, shape) in enumerate(names_and_shapes(c))}
//! sd["model.layers.{l}.self_attn.q_proj.weight"] = shared[group_of(l)]["q"] + B_l @ A_l  # etc.
//! model = LlamaForCausalLM(cfg).double(); model.load_state_dict(sd, strict=True)
//! logits = model(input_ids=IDS).logits  # (B, T, V) float64
//! FIRST = logits[..., :5].flatten(); SUM = logits.sum(-1); SUMSQ = logits.pow(2).sum(-1)
//! LOSS = F.cross_entropy(logits[:, :-1].reshape(-1, V), IDS[:, 1:].reshape(-1))
//! ```
//!
//! Stock transformers computes RMSNorm, the RoPE angles and the eager softmax in float32
//! even in a float64 model (agreement would stop at ~1e-6); the script patches those three
//! functions to run in float64 with unchanged formulas, and asserts that the stock model
//! agrees with the patched one to float32 accuracy.
//!
//! Regenerate (the venv is not a test or CI dependency):
//! `python3 -m venv /tmp/golden-venv && /tmp/golden-venv/bin/pip install torch transformers`
//! then `/tmp/golden-venv/bin/python scripts/golden_reference.py` and paste its output
//! verbatim over everything after the last `// Each *_FIRST` line. Generated with torch
//! 2.15.0 (the PyPI wheel, run on CPU), transformers 5.24.0, numpy 2.4.6, Python 3.11.

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use lors_lm::config::{Config, Mode, Proj};
use lors_lm::model::Model;
use lors_lm::model::ParamStore;
use std::collections::HashMap;

/// Token ids (B = 2, T = 7), as `IDS` in the script.
const IDS: [[u32; 7]; 2] = [[3, 17, 42, 8, 60, 0, 25], [59, 1, 33, 33, 12, 47, 5]];
/// Golden logits: the first N_LOGITS vocab entries at every position.
const N_LOGITS: usize = 5;
/// Relative tolerance (against max(|golden|, 1)) in float64.
const TOL: f64 = 1e-9;

/// (a) LORS, GQA (4 heads, 2 kv heads), tied head, rank 3, 2 groups over 3 layers;
/// (b) vanilla Llama, untied head, n_kv_heads = n_heads, another rope_theta and norm_eps.
fn config(lors: bool) -> Config {
    let mut c = Config::tiny();
    let m = &mut c.model;
    m.vocab_size = 61;
    m.d_model = 32;
    m.n_layers = 3;
    m.n_heads = 4;
    m.ffn_hidden = 48;
    m.max_seq_len = 32;
    if lors {
        m.n_kv_heads = 2;
        m.tie_embeddings = true;
        m.rope_theta = 10000.0;
        m.norm_eps = 1e-5;
        c.lors.mode = Mode::Lors;
        c.lors.rank = 3;
        c.lors.groups = 2;
        // Layers 0-1 share group 0, layer 2 is group 1 (as group_of in the script).
        assert_eq!((0..3).map(|l| c.lors.group_of(l, 3)).collect::<Vec<_>>(), [Some(0), Some(0), Some(1)]);
    } else {
        m.n_kv_heads = 0; // = n_heads
        m.tie_embeddings = false;
        m.rope_theta = 500000.0;
        m.norm_eps = 1e-6;
        c.lors.mode = Mode::Vanilla;
    }
    c
}

/// Every parameter in a fixed order (the script's `names_and_shapes`); k = index here.
fn names_and_shapes(c: &Config) -> Vec<(String, Vec<usize>)> {
    let m = &c.model;
    let lors = c.lors.mode == Mode::Lors;
    let shape = |p: Proj| {
        let (o, i) = p.shape(m);
        vec![o, i]
    };
    let mut out = vec![("embed.weight".to_string(), vec![m.vocab_size, m.d_model])];
    if lors {
        for g in 0..c.lors.groups {
            for p in Proj::ALL {
                out.push((format!("shared.{g}.{p}.weight"), shape(p)));
            }
        }
    }
    for l in 0..m.n_layers {
        out.push((format!("layers.{l}.attn_norm.weight"), vec![m.d_model]));
        out.push((format!("layers.{l}.ffn_norm.weight"), vec![m.d_model]));
        for p in Proj::ALL {
            let (o, i) = p.shape(m);
            if lors {
                out.push((format!("layers.{l}.{p}.lors_a"), vec![c.lors.rank, i]));
                out.push((format!("layers.{l}.{p}.lors_b"), vec![o, c.lors.rank]));
            } else {
                out.push((format!("layers.{l}.{p}.weight"), vec![o, i]));
            }
        }
    }
    out.push(("norm.weight".to_string(), vec![m.d_model]));
    if !m.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![m.vocab_size, m.d_model]));
    }
    out
}

/// Element i (row-major) of the k-th tensor: u = (h - 498) / 498 with the integer
/// h = (31 i² + 17 i + 101 k + 7) mod 997 (full-rank "chirp" matrices), times an amplitude.
fn tensor(name: &str, shape: &[usize], k: usize) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let fan_in = *shape.last().unwrap() as f64;
    let data: Vec<f64> = (0..n as i64)
        .map(|i| {
            let h = (31 * i * i + 17 * i + 101 * k as i64 + 7) % 997;
            let u = (h - 498) as f64 / 498.0;
            if name.ends_with("norm.weight") {
                1.0 + 0.25 * u
            } else if name == "embed.weight" {
                u
            } else if name.ends_with("lors_b") {
                u * (1.0 / fan_in.sqrt())
            } else {
                u * (2.0 / fan_in.sqrt())
            }
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn build(c: &Config) -> Result<Model> {
    let map = names_and_shapes(c)
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| Ok((name.clone(), tensor(name, shape, k)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let mut store = ParamStore::from_tensors(map, DType::F64, &Device::Cpu);
    Model::new(&c.model, &c.lors, &mut store) // also fails on unused tensors: the name lists agree
}

fn ids() -> Result<Tensor> {
    Ok(Tensor::new(&IDS, &Device::Cpu)?)
}

/// Largest |got - want| / max(|want|, 1); panics (naming `what`) above TOL.
fn check(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        if err > worst.0 || err.is_nan() {
            worst = (err, i); // also catches NaN
        }
    }
    let (err, i) = worst;
    assert!(err <= TOL, "{what}[{i}]: got {} want {} (rel err {err:.3e})", got[i], want[i]);
    err
}

/// Compare logits (B, T, V) with the golden selection, sums and sums of squares.
fn check_logits(what: &str, logits: &Tensor, first: &[f64], sum: &[f64], sumsq: &[f64]) -> Result<f64> {
    let got_first = logits.narrow(2, 0, N_LOGITS)?.flatten_all()?.to_vec1::<f64>()?;
    let got_sum = logits.sum(2)?.flatten_all()?.to_vec1::<f64>()?;
    let got_sumsq = logits.sqr()?.sum(2)?.flatten_all()?.to_vec1::<f64>()?;
    let e1 = check(&format!("{what} first logits"), &got_first, first);
    let e2 = check(&format!("{what} logit sums"), &got_sum, sum);
    let e3 = check(&format!("{what} logit sums of squares"), &got_sumsq, sumsq);
    Ok(e1.max(e2).max(e3))
}

fn golden_case(lors: bool, first: &[f64], sum: &[f64], sumsq: &[f64], loss: f64) -> Result<()> {
    let tag = if lors { "lors" } else { "vanilla" };
    let c = config(lors);
    let model = build(&c)?;
    let ids = ids()?;
    let logits = model.forward(&ids)?;
    assert_eq!(logits.dims(), [2, 7, 61]);
    assert_eq!(logits.dtype(), DType::F64);
    let e_fwd = check_logits(&format!("{tag} forward"), &logits, first, sum, sumsq)?;

    // Mean cross-entropy of ids[:, 1:] predicted from positions 0..T-1.
    let t = IDS[0].len();
    let pred = logits.narrow(1, 0, t - 1)?.contiguous()?;
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let got_loss = Model::loss(&pred, &targets)?.to_scalar::<f64>()?;
    let e_loss = check(&format!("{tag} loss"), &[got_loss], &[loss]);

    // The generation paths: merged weights, and token-by-token decoding with a KV cache.
    let merged = model.merged()?;
    let e_merged = check_logits(&format!("{tag} merged"), &merged.forward(&ids)?, first, sum, sumsq)?;
    let mut cache = merged.new_cache();
    let mut steps = vec![];
    for pos in 0..t {
        steps.push(merged.forward_at(&ids.i((.., pos..pos + 1))?, pos, Some(&mut cache))?);
    }
    let e_cache = check_logits(&format!("{tag} kv-cache"), &Tensor::cat(&steps, 1)?, first, sum, sumsq)?;

    eprintln!(
        "{tag}: max rel err forward {e_fwd:.2e}, loss {e_loss:.2e}, merged {e_merged:.2e}, kv-cache {e_cache:.2e}"
    );
    Ok(())
}

#[test]
fn lors_gqa_tied_matches_transformers() -> Result<()> {
    golden_case(true, &LORS_FIRST, &LORS_SUM, &LORS_SUMSQ, LORS_LOSS)
}

#[test]
fn vanilla_untied_matches_transformers() -> Result<()> {
    golden_case(false, &VANILLA_FIRST, &VANILLA_SUM, &VANILLA_SUMSQ, VANILLA_LOSS)
}

// ------------------------------------------------ output of scripts/golden_reference.py
// Each *_FIRST is logits[b, t, 0..5] flattened (b, t, v); *_SUM / *_SUMSQ are per (b, t).
// torch 2.15.0+cu132, transformers 5.24.0, numpy 2.4.6
// LORS: max |logit| 11.101, stock-transformers drift 3.22e-06
#[rustfmt::skip]
const LORS_FIRST: [f64; 70] = [-4.428801786646703, -1.843614501292043, -5.016930751193872, -0.5616489424746457, -4.586594913086474, -0.23846660036686898, -1.951517096985417, -2.823595591437169, 1.1412346785595653, -2.925106670777154, 1.3558274203099434, 1.1287442016341074, -2.4419233326839276, 5.397613700467289, -0.8347970622971822, -3.2308487575297287, -3.004689474506196, -4.025944904941475, 2.1936514071702793, -2.905846157204503, -1.5688979153703202, -3.41739698499529, -5.717694411380715, 2.6346411991325267, -1.5037078980952667, -4.473560887934076, -2.255679916968654, -3.512957046244307, 1.961916923897664, -4.83107111614553, 3.9893855063935293, -1.3669637558001093, 2.086924720966839, 0.042440449831203195, -2.374226769113754, 1.3108827674494028, 0.4299692047179028, 0.47312730553091964, 4.361507544560514, -4.216692342931519, 0.18684713518041776, -3.7655604105702905, 0.2451195251410484, -2.1910324243762394, -2.3336290407484106, 1.8006620884326483, -3.6253402801871024, 1.8467503257753548, -2.465853952365878, -6.224651981582518, 0.8740537553340185, -2.8007175106106788, 1.3290235521513294, -2.2052506244269034, -5.720733632954065, 2.712505901051084, 0.23455947255437753, 0.6162579546322579, 2.726719708673001, -3.668292277817404, 0.34959444769666126, 1.5527777217535061, 1.9755107956595899, -2.6583481630715085, -1.5571794875111131, 3.0653212089219384, 2.785181109205859, -0.35298645921570393, 0.9464183766722234, 0.18007968329261526];
#[rustfmt::skip]
const LORS_SUM: [f64; 14] = [-7.472052573320124, 28.362825791338743, 26.727375083227965, -14.350150049126713, 3.273199253475315, 8.827300806644017, -6.738744244335056, -12.525302166667803, -2.263671103944029, -16.979979681183913, -30.769027447269906, -30.429018433894605, -35.533649963501176, -28.59945421589805];
#[rustfmt::skip]
const LORS_SUMSQ: [f64; 14] = [711.8843607764322, 799.0366958355103, 541.7844488935391, 597.75728555073, 828.6382152876968, 520.0720293933775, 770.5043907998034, 611.4445014271012, 545.4286809900709, 690.2393365424764, 641.2409517940084, 649.7465867800729, 713.9781380937328, 414.28157283414424];
const LORS_LOSS: f64 = 7.731029187429983;
// VANILLA: max |logit| 4.195, stock-transformers drift 1.07e-06
#[rustfmt::skip]
const VANILLA_FIRST: [f64; 70] = [-0.44042253594858494, -0.3533153043806655, -0.7510090892260767, 2.37068965698455, -0.10210834223455688, 1.6209590380978633, 0.8869301626391742, 1.563293855518297, 0.44062819880425064, 1.6349275272118569, 0.7905862833981788, 0.8557144363438927, 1.5833121858349917, -0.051517294899402474, -0.07351149098430809, 1.5746884525093192, 0.21172557571370673, 0.6530093243699432, 1.8106635029110831, -1.1503341061812822, -0.5626459882687876, 0.46827936490501654, 0.5383809840049987, -0.5451061786256695, 1.3051451668141754, 1.9095442508234357, -0.16289976854516244, -0.1860365146185604, 1.7343886877236019, -0.3930026469953677, 0.5732500818863394, -0.19694209766773368, -0.9017439388504565, 2.185599647994405, -1.051135882958136, 0.7713169586063122, 0.9129501341759385, 1.29215877449381, -0.05524608306441829, 1.3917661010696476, 0.8914594661663608, 1.2742895006038197, 1.1465226185658026, 0.2790284029408943, 1.2759770511660642, -0.6123241188341944, -0.9637824128517822, -2.4163166764380164, 1.3864043957941006, -0.2437407358444528, -0.6850181085151258, -1.1168288809011542, -2.4100088071237495, 1.347478824156881, -0.34603920488101175, -0.726919911159801, 1.493877638340143, 1.6044061008259995, -0.9495395234663504, 1.7579994011517477, -0.41072474123536373, 0.5962703583817872, -0.33856062807684606, -0.24485391480214622, 1.2332150374731556, -1.3417296957872697, -0.013533893866978952, -0.8448399186763869, 0.3461883796732558, 0.008271517953866159];
#[rustfmt::skip]
const VANILLA_SUM: [f64; 14] = [3.003188745170081, -0.14938868113124126, 6.977715879244745, 2.001856455072506, -21.83491811947772, 7.031105909977635, 13.403895150221826, 24.052029262793766, 16.346119114799226, 0.45780263640384344, 1.4860780900173864, -1.2252235306462564, 9.941807999294612, -14.689100873403957];
#[rustfmt::skip]
const VANILLA_SUMSQ: [f64; 14] = [78.05723272288121, 89.34642799573524, 100.23834044717483, 108.31601365582023, 77.5129223389524, 92.40327253326804, 94.6178684733138, 77.29132553177655, 82.69424249267975, 74.0924939433441, 68.63561494365412, 81.59409331295669, 68.6124686892433, 90.34090529425866];
const VANILLA_LOSS: f64 = 5.242286444688834;
