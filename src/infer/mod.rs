//! Using a trained model: text generation (`generate.rs`), perplexity (`perplexity.rs`), and
//! which weights an inference model keeps (`weights.rs`: merged, factored, or the `auto` rule).

pub mod generate;
pub mod perplexity;
pub mod weights;

pub use generate::{generate_tokens, Sampler};
pub use perplexity::{eval_tokens, EvalResult};
