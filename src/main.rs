use clap::{Parser, Subcommand};

/// Train decoder-only LMs whose stacked layers share their weights the LORS way.
#[derive(Parser)]
#[command(name = "lors-lm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize text files into token files (train.bin, val.bin) plus tokenizer.json and meta.json.
    Prepare(lors_lm::data::PrepareArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => lors_lm::data::run_prepare(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
