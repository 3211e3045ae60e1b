//! Model file formats other than our own checkpoints, both ways: the Hugging Face Llama
//! directory (`hf.rs`) and llama.cpp's GGUF file (`gguf/`); with them the `tokenizer.json` file
//! (`tokenizer.rs`) and Hub model repos (`hub.rs`), which Hugging Face directories, run
//! directories and `prepare --tokenizer` all read.

pub mod gguf;
pub mod hf;
pub mod hub;
mod tokenizer;

pub use hub::fetch_hub_file;
pub use tokenizer::load_tokenizer;
