//! `lors-lm prepare`: text files → tokenizer + token files (`data/`).

pub use crate::data::PrepareArgs;

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    crate::data::run_prepare(args)
}
