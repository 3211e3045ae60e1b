//! Data preparation: text files → tokenizer + memory-mappable token files.
//!
//! `lors-lm prepare` turns a corpus of UTF-8 text files into a *prepared directory*:
//!
//! | file             | contents                                                          |
//! |------------------|-------------------------------------------------------------------|
//! | `tokenizer.json` | the Hugging Face `tokenizers` tokenizer used (trained or loaded)   |
//! | `train.bin`      | the first `1 - val_fraction` of the token stream, little-endian    |
//! | `val.bin`        | the last `val_fraction` of the token stream, same dtype            |
//! | `meta.json`      | [`Meta`]: vocabulary size, dtype, token counts, inputs, tokenizer  |
//!
//! Token files hold `u16` ids when the vocabulary has at most 65 536 entries, else `u32`; no
//! header. `meta.json` is written last (temp file + rename): a directory with a `meta.json`
//! is complete.
//!
//! **Corpus text.** Inputs are files or directories (searched recursively for `*.txt`, sorted
//! by path component-wise, so results do not depend on the file system's order). Files are
//! concatenated in the order given; a `\n` is inserted between two files when the earlier one
//! does not already end in one, nothing is appended after the last file, and empty files
//! contribute nothing. No end-of-text token is inserted between files; a literal
//! `<|endoftext|>` *in the text* is encoded as the special token, so a corpus can mark its
//! own document boundaries.
//!
//! **Tokenizer.** By default a byte-level BPE tokenizer (GPT-2 style: byte alphabet,
//! GPT-2 split regex, no prefix space) is trained on the corpus. Its special token
//! `<|endoftext|>` has id 0 and is recorded as both `bos_id` and `eos_id`; ids 1..=256 are
//! the 256 byte symbols, so every byte sequence stays encodable and decoding reproduces the
//! text exactly. Alternatively an existing `tokenizer.json` or `hf:OWNER/NAME` is used.
//!
//! **Split.** The validation split is the *last* `val_fraction` of the token stream (rounded
//! to the nearest token), the training split everything before it.
//!
//! **Where things live.**
//!
//! | file           | what                                                                       |
//! |----------------|----------------------------------------------------------------------------|
//! | `prepare.rs`   | the pipeline behind `lors-lm prepare`: [`prepare`] with [`PrepareOptions`] |
//! | `tokenizer.rs` | BPE training, loading `tokenizer.json`, bos/eos ids, exact chunking        |
//! | `tokens.rs`    | [`Meta`] (`meta.json`), [`TokenFile`] (memory-mapped `*.bin`), the writers |
//! | `hub.rs`       | [`fetch_hub_file`]: files of a Hugging Face Hub repo (`HF_HUB_OFFLINE`)    |
mod hub;
mod prepare;
pub mod shards;
mod tokenizer;
mod tokens;

pub use hub::fetch_hub_file;
pub use prepare::{prepare, PrepareOptions, DEFAULT_VAL_FRACTION, MIN_SPLIT_TOKENS};
pub use tokenizer::{find_bos_eos, load_tokenizer, DEFAULT_VOCAB_SIZE, EOT, MIN_VOCAB_SIZE};
pub use shards::{Shard, ShardInfo};
pub use tokens::{write_prepared_dir, write_tokens, InputFile, Meta, SplitShards, TokenFile, FORMAT_VERSION};

/// Prints a progress line of `prepare` (also used by the Hub download) on stderr.
fn progress(msg: &str) {
    eprintln!("prepare: {msg}");
}
