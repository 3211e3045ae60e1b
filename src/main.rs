use clap::{Parser, Subcommand};
use lors_lm::cmd::{
    bench, check_device, compress, eval, export, generate, launch, params, prepare, probe, sweep, train,
};
use lors_lm::device;

/// mimalloc for `prepare`, the system allocator for the rest (src/alloc.rs says why).
#[global_allocator]
static ALLOC: lors_lm::alloc::PerCommand = lors_lm::alloc::PerCommand::new();

/// Train decoder-only LMs whose stacked layers share their weights the LORS way:
/// every layer l uses W_l = W_shared + B_l·A_l.
#[derive(Parser)]
#[command(
    name = "lors-lm",
    version,
    about,
    after_help = "Environment:\n  \
        LORS_LM_BLAS       CPU f32 matmul library: auto (the default: OpenBLAS where libopenblas.so.0\n                     \
        is installed, else the gemm crate), openblas (an error without it) or gemm\n  \
        RAYON_NUM_THREADS  CPU threads (default: one per core)\n  \
        LORS_LM_ALLOC      memory allocator: mimalloc for prepare, the system's for the other commands\n                     \
        (set to system or mimalloc to choose; see docs/performance.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize text files into token files (train.bin, val.bin) plus tokenizer.json and meta.json.
    Prepare(prepare::PrepareArgs),
    /// Train a model from a config on prepared data.
    Train(train::TrainArgs),
    /// Generate text from a trained run.
    Generate(generate::GenerateArgs),
    /// Mean next-token loss and perplexity of a run on prepared data or a text file.
    Eval(eval::EvalArgs),
    /// Export a run as a plain Hugging Face Llama checkpoint (LORS weights merged).
    Export(export::ExportArgs),
    /// Compress a trained model (run, Hugging Face dir) into a LORS run: mean bases per group,
    /// truncated SVD of each layer's residual.
    Compress(compress::CompressArgs),
    /// Print the parameter table of a config or a run: unique vs vanilla.
    Params(params::ParamsArgs),
    /// Measure training-step and generation throughput of a config per sharing mode, or with
    /// --decode inference: merged against factored weights.
    Bench(bench::BenchArgs),
    /// Start N ranks of data-parallel training on this machine (no MPI needed): one per GPU,
    /// or CPU ranks. `lors-lm launch --nproc 2 -- train --config c.toml --device cuda`.
    Launch(launch::LaunchArgs),
    /// Train every configuration × seed of a comparison plan; write a results table and charts.
    Sweep(sweep::SweepArgs),
    /// Check that a device (e.g. cuda) and dtype give the CPU's logits and loss, before and after one step.
    CheckDevice(check_device::CheckDeviceArgs),
    /// Internal: read bandwidth at given working-set sizes (for `--weights auto`).
    #[command(hide = true)]
    ProbeMemory(probe::ProbeArgs),
}

fn main() {
    device::tune_allocator();
    device::tune_threads();
    lors_lm::train::distributed::launcher::tune_threads_for_ranks();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => prepare::run(&args),
        Command::Train(args) => train::run(&args).map(|_| ()),
        Command::Generate(args) => generate::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Compress(args) => compress::run(&args),
        Command::Params(args) => params::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Sweep(args) => sweep::run(&args),
        Command::Launch(args) => match launch::run(&args) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Command::CheckDevice(args) => check_device::run(&args),
        Command::ProbeMemory(args) => probe::run(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
