//! Using a trained model: text generation (`generate.rs`) and perplexity (`perplexity.rs`).

pub mod generate;
pub mod perplexity;

pub use generate::{generate_tokens, Sampler};
pub use perplexity::{eval_tokens, EvalResult};
