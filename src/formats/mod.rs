//! Model file formats other than our own checkpoints: the Hugging Face Llama directory
//! (`hf.rs`), both ways.

pub mod hf;
