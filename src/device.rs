//! `--device cpu|cuda|cuda:N`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        cpu_matmul()?; // refuses a bad or unmet LORS_LM_BLAS before any work starts
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.as_str() {
        "cuda" => 0,
        s if s.starts_with("cuda:") => {
            s[5..].parse::<usize>().with_context(|| format!("--device {spec}: expected cuda:N with N a GPU index"))?
        }
        _ => bail!("--device {spec}: expected cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        bail!("--device {spec}: this lors-lm was built without CUDA; rebuild with `cargo build --release --features cuda` (see scripts/build_cuda.sh), or use --device cpu");
    }
    Device::new_cuda(ordinal).with_context(|| {
        format!("--device {spec}: cannot open CUDA device {ordinal} (is a GPU present and the driver loaded?)")
    })
}

/// Which library runs f32 matmuls on the CPU, for run headers: "OpenBLAS (libopenblas.so.0)"
/// or "gemm (why not OpenBLAS)". `LORS_LM_BLAS` chooses: `auto` (the default: OpenBLAS where
/// it is installed), `openblas` (an error without it) or `gemm`.
pub fn cpu_matmul() -> Result<String> {
    let wanted = std::env::var("LORS_LM_BLAS").unwrap_or_default();
    if !matches!(wanted.as_str(), "" | "auto" | "openblas" | "gemm") {
        bail!("LORS_LM_BLAS={wanted}: expected auto, openblas or gemm");
    }
    #[cfg(feature = "openblas")]
    let found = candle_core::cpu_backend::openblas::backend();
    #[cfg(not(feature = "openblas"))]
    let found: std::result::Result<&str, &str> = Err("built without the openblas feature");
    match found {
        Ok(name) => Ok(format!("OpenBLAS ({name})")),
        Err(why) if wanted == "openblas" => bail!(
            "LORS_LM_BLAS=openblas, but {why}: install OpenBLAS (Debian/Ubuntu: apt install libopenblas0) or unset LORS_LM_BLAS"
        ),
        Err(why) if wanted == "gemm" => Ok(format!("gemm ({why})")),
        Err(why) => Ok(format!("gemm ({why}; install libopenblas0 for ~1.1x faster training)")),
    }
}

/// The device for run headers: "cpu (2 threads, matmul: OpenBLAS ...)" or the CUDA device.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!(
            "cpu ({} threads, matmul: {})",
            candle_core::utils::get_num_threads(),
            cpu_matmul().unwrap_or_else(|e| e.to_string())
        ),
        other => format!("{other:?}"),
    }
}

/// Let f32 matmuls on CUDA use TF32 tensor cores (`train.tf32`); nothing to do on the CPU.
pub fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// The GPU's name from `nvidia-smi` (None on the CPU or when it is not available).
pub fn gpu_name(device: &Device) -> Option<String> {
    let Device::Cuda(_) = device else { return None };
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    };
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", &format!("--id={ordinal}")])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// Dense peak TFLOP/s (no sparsity) of known GPUs for a matmul precision: "bf16", "tf32" or
/// "f32". Sources: NVIDIA's H100/H200 and A100 datasheets (SXM parts).
pub fn peak_tflops_of(gpu: &str, precision: &str) -> Option<f64> {
    let g = gpu.to_ascii_uppercase();
    let table: [(&str, f64, f64, f64); 3] =
        [("H200", 989.0, 494.5, 66.9), ("H100", 989.0, 494.5, 66.9), ("A100", 312.0, 156.0, 19.5)];
    let (_, bf16, tf32, f32) = table.iter().find(|(name, ..)| g.contains(name))?;
    match precision {
        "bf16" => Some(*bf16),
        "tf32" => Some(*tf32),
        "f32" => Some(*f32),
        _ => None,
    }
}

/// Peak TFLOP/s used for MFU: `train.peak_tflops` if set, else the GPU's from the table
/// (bf16, or f32/TF32 by `train.tf32`), else None (no MFU, e.g. on the CPU). Returns the
/// value and where it came from.
pub fn peak_tflops(tc: &crate::config::TrainConfig, device: &Device) -> Option<(f64, String)> {
    if let Some(p) = tc.peak_tflops {
        return Some((p, "train.peak_tflops".into()));
    }
    let gpu = gpu_name(device)?;
    let precision = match (tc.dtype.as_str(), tc.tf32) {
        ("bf16", _) => "bf16",
        (_, true) => "tf32",
        _ => "f32",
    };
    peak_tflops_of(&gpu, precision).map(|p| (p, format!("{gpu}, dense {precision}")))
}

/// Make glibc keep freed memory for reuse instead of returning it to the kernel.
///
/// Every candle op allocates its output; by default glibc serves each allocation over
/// 128 KiB–32 MiB with a fresh `mmap` and returns it with `munmap` when the tensor drops, so
/// every step of training page-faults its whole working set back in (zeroed by the kernel)
/// and flushes TLBs on both cores: a perf profile of a d 128 step spent ~40 % of its time in
/// the kernel doing exactly that. Serving everything from the heap and never trimming it
/// keeps the pages mapped between steps (peak RSS is unchanged: it is the step's peak
/// either way). A user's own `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` settings win.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes allocator parameters; it is called once at start-up,
        // before other threads exist.
        unsafe {
            if !set("MALLOC_MMAP_MAX_") && !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

/// Make candle's elementwise worker threads park sooner after each op.
///
/// candle runs elementwise ops on its own small thread pool, next to rayon's pool that runs
/// the matmuls and our fused kernels; with as many rayon threads as cores, a candle worker
/// that spins 25,000 times (candle's default) after every op takes a core from the matmul
/// running next. At 2,000 spins a bench-small step was 6 % faster and a bench-medium one 5 %
/// (median of 3 interleaved runs each, docs/performance.md). A user's own
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins. Call at start-up, before other threads exist.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}
