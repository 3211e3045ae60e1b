// TEMPORARY placeholder until the data branch lands (replaced on merge).
use anyhow::{bail, Context, Result};
use std::path::Path;
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Meta { pub vocab_size: usize, pub dtype: String, pub train_tokens: u64, pub val_tokens: u64, pub bos_id: Option<u32>, pub eos_id: Option<u32>, pub tokenizer_source: String }
impl Meta { pub fn load(dir: &Path) -> Result<Meta> { let p = dir.join("meta.json"); Ok(serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("no meta.json in {}", dir.display()))?)?) } }
pub struct TokenFile { data: Vec<u32> }
impl TokenFile {
    pub fn open(dir: &Path, split: &str, meta: &Meta) -> Result<TokenFile> {
        let b = std::fs::read(dir.join(format!("{split}.bin")))?;
        let data = if meta.dtype == "u16" { b.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect() } else { b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
        Ok(TokenFile { data })
    }
    pub fn len(&self) -> usize { self.data.len() }
    pub fn is_empty(&self) -> bool { self.data.is_empty() }
    pub fn window(&self, start: usize, len: usize) -> Result<Vec<u32>> { Ok(self.data[start..start + len].to_vec()) }
    pub fn max_id(&self) -> u32 { self.data.iter().copied().max().unwrap_or(0) }
}
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> { tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("{e}")) }
pub fn write_tokens(path: &Path, tokens: &[u32], dtype: &str) -> Result<()> {
    let mut b = vec![]; for &t in tokens { if dtype == "u16" { b.extend_from_slice(&(t as u16).to_le_bytes()) } else { b.extend_from_slice(&t.to_le_bytes()) } }
    std::fs::write(path, b)?; Ok(())
}
pub fn write_prepared_dir(dir: &Path, train: &[u32], val: &[u32], vocab_size: usize, tokenizer: Option<&Path>) -> Result<Meta> {
    std::fs::create_dir_all(dir)?;
    write_tokens(&dir.join("train.bin"), train, "u16")?; write_tokens(&dir.join("val.bin"), val, "u16")?;
    if let Some(t) = tokenizer { std::fs::copy(t, dir.join("tokenizer.json"))?; }
    let m = Meta { vocab_size, dtype: "u16".into(), train_tokens: train.len() as u64, val_tokens: val.len() as u64, bos_id: None, eos_id: None, tokenizer_source: "synthetic".into() };
    std::fs::write(dir.join("meta.json"), serde_json::to_string(&m)?)?; Ok(m)
}
#[derive(clap::Args, Debug)]
pub struct PrepareArgs { #[arg(long)] pub out: String }
pub fn run_prepare(_a: &PrepareArgs) -> Result<()> { bail!("not yet") }
