//! Model file formats other than our own checkpoints, both ways: the Hugging Face Llama
//! directory (`hf.rs`) and llama.cpp's GGUF file (`gguf/`).

pub mod gguf;
pub mod hf;
