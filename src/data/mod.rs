//! Data preparation: a corpus → tokenizer + token shards, read by the trainer as token windows.
//!
//! `lors-lm prepare` turns a corpus into a *prepared directory*:
//!
//! | file                     | contents                                                            |
//! |--------------------------|---------------------------------------------------------------------|
//! | `tokenizer.json`         | the Hugging Face `tokenizers` tokenizer used (trained, loaded, or the `--bytes` vocabulary) |
//! | `train-NNNNN.bin`        | training shards: header, token ids, document index ([`shards`])     |
//! | `val-NNNNN.bin`          | validation shards, same format                                      |
//! | `meta.json`              | [`Meta`]: vocabulary, dtype, counts, the shards and their SHA-256, inputs, tokenizer, split |
//! | `prepare-state.json`     | only while a prepare is unfinished: what `--resume` continues from  |
//!
//! Token ids are `u16` when the vocabulary has at most 65 536 entries, else `u32`. `meta.json`
//! is written last (temp file + rename): a directory with a `meta.json` is complete.
//! Directories written before shards (`train.bin`/`val.bin`, `format_version` 1) are still read.
//!
//! **Documents.** Inputs are text files (a document each), JSON lines (a document per line,
//! its `--text-field`), Parquet files (a document per row of that column), directories of
//! those, and Hugging Face dataset repos (`hf:datasets/OWNER/NAME[@REV][:CONFIG/SPLIT]`), read
//! in order ([`input`]). Empty documents are skipped. The tokenizer's end-of-text token follows
//! every document, so training windows see where one ends; a literal `<|endoftext|>` *in the
//! text* is also encoded as the special token.
//!
//! **Tokenizer.** By default a byte-level BPE tokenizer (GPT-2 style: byte alphabet, GPT-2
//! split regex, no prefix space) is trained on a sample of about `--tokenizer-sample-bytes` of
//! the training documents, picked by a hash of each document (`prepare::sample_key`) so that it
//! spreads over the whole corpus. Its special token `<|endoftext|>` has id 0 and is recorded as both
//! `bos_id` and `eos_id`; the 256 byte symbols are tokens too, so every text stays encodable
//! and decoding reproduces it exactly. Alternatively an existing `tokenizer.json`, a GGUF or
//! `hf:OWNER/NAME` is used, or `--bytes`: 256 byte tokens (id = byte + 1) and
//! `<|endoftext|>` = 0, reading text files byte for byte (valid UTF-8 or not).
//!
//! **Split.** The validation split is whole documents chosen by a seeded hash of their text
//! ([`split`]): adding documents moves none of the others.
//!
//! **Where things live.**
//!
//! | file           | what                                                                        |
//! |----------------|-----------------------------------------------------------------------------|
//! | `prepare.rs`   | `lors-lm prepare`: [`prepare`] with [`PrepareOptions`]; the scan (pass 1)   |
//! | `input/`       | the `--input` arguments → files; one reader per format behind one iterator  |
//! | `split.rs`     | document keys and the validation split                                      |
//! | `tokenizer.rs` | BPE training, `--tokenizer` sources, bos/eos ids, exact chunking            |
//! | `encode.rs`    | texts → ids, in parallel; the `--bytes` tokenizer                           |
//! | `pipeline.rs`  | pass 2: read → encode → write shards, with bounded buffers                  |
//! | `resume.rs`    | `prepare-state.json`: what `--resume` checks and continues from             |
//! | `shards.rs`    | the shard format: writer and memory-mapped reader                           |
//! | `tokens.rs`    | [`Meta`] (`meta.json`), [`TokenFile`] (a split's shards as one stream)      |
//! | `hub.rs`       | Hugging Face Hub datasets through hf-hub's cache (`HF_HUB_OFFLINE`)         |
mod encode;
mod hub;
pub mod input;
mod options;
mod pipeline;
mod prepare;
mod resume;
pub mod shards;
pub mod split;
mod tokenizer;
mod tokens;

pub use encode::byte_tokenizer;
pub use hub::fetch_hub_dataset;
pub use prepare::{
    prepare, PrepareOptions, DEFAULT_SHARD_TOKENS, DEFAULT_TOKENIZER_SAMPLE_BYTES, DEFAULT_VAL_FRACTION,
    MIN_SPLIT_TOKENS,
};
pub use shards::{Shard, ShardInfo};
pub use split::DEFAULT_SPLIT_SEED;
pub use tokenizer::{find_bos_eos, is_byte_level, DEFAULT_VOCAB_SIZE, EOT, MIN_VOCAB_SIZE};
pub use tokens::{write_prepared_dir, write_tokens, InputFile, Meta, SplitShards, TokenFile, FORMAT_VERSION};

/// Prints a progress line of `prepare` (also used by the Hub download) on stderr.
fn progress(msg: &str) {
    eprintln!("prepare: {msg}");
}
