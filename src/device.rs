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

/// Give the heap's free memory back to the kernel (glibc's `malloc_trim`), so that RSS
/// measures live data again after a large transient (`bench --decode`, after building and
/// converting a model). `tune_allocator` keeps freed memory otherwise.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
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

// ---------------------------------------------------------------------------------------------
// CPU caches and memory bandwidth (the `--weights auto` rule and `bench --decode`)
// ---------------------------------------------------------------------------------------------

/// One data or unified cache level as sysfs reports it for cpu0.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheLevel {
    pub level: u32,
    /// Bytes of one instance (one per core for L1/L2 on most CPUs, one per socket for L3).
    pub bytes: u64,
    /// CPUs sharing one instance.
    pub shared_cpus: usize,
}

/// The data and unified caches of cpu0, smallest level first, from
/// `/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size,shared_cpu_list}` (Linux);
/// empty where sysfs does not say.
pub fn cpu_caches() -> Vec<CacheLevel> {
    let mut out = vec![];
    for i in 0..8 {
        let dir = std::path::PathBuf::from(format!("/sys/devices/system/cpu/cpu0/cache/index{i}"));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_string()).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else { continue };
        if kind == "Instruction" {
            continue;
        }
        let (Ok(level), Some(bytes)) = (level.parse(), parse_size(&size)) else { continue };
        let shared_cpus = read("shared_cpu_list").map_or(1, |l| count_cpus(&l));
        out.push(CacheLevel { level, bytes, shared_cpus });
    }
    out.sort_by_key(|c| c.level);
    out
}

/// Bytes of the last-level cache instance (None where sysfs does not say).
pub fn last_level_cache() -> Option<u64> {
    cpu_caches().last().map(|c| c.bytes)
}

/// "48K", "2048K", "480M" → bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

/// Number of CPUs in a list such as "0-1,4".
fn count_cpus(list: &str) -> usize {
    list.split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some(b.trim().parse::<usize>().ok()? + 1 - a.trim().parse::<usize>().ok()?),
            None => r.trim().parse::<usize>().ok().map(|_| 1),
        })
        .sum()
}

/// The caches in one line: "L1d 48 KiB/core, L2 2 MiB/core, L3 480 MiB shared by 2 CPUs".
pub fn describe_caches(caches: &[CacheLevel]) -> String {
    if caches.is_empty() {
        return "cache sizes unknown (no /sys/devices/system/cpu/cpu0/cache)".into();
    }
    let parts: Vec<String> = caches
        .iter()
        .map(|c| {
            let who =
                if c.shared_cpus <= 1 { "/core".to_string() } else { format!(" shared by {} CPUs", c.shared_cpus) };
            format!("L{} {}{who}", c.level, human_bytes(c.bytes))
        })
        .collect();
    parts.join(", ")
}

/// 3 MiB, 480 MiB, 1.5 GiB.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// Read bandwidth in GB/s (10⁹ bytes) of summing a buffer of `bytes` f32 values on every
/// rayon thread, each its own contiguous share: the best of `passes` timed passes after one
/// untimed one. A buffer well beyond the last-level cache measures DRAM; smaller ones the
/// cache level they fit. (`cargo bench --bench stream` sweeps the sizes.)
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1024);
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads());
    let mut best = f64::MAX;
    let mut sink = 0f32;
    for pass in 0..=passes.max(1) {
        let t0 = std::time::Instant::now();
        sink += buf.par_chunks(chunk).map(sum_f32).sum::<f32>();
        if pass > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best / 1e9
}

/// Σ x with 16 running sums (vectorises; AVX-512 or AVX2 where the CPU has them).
fn sum_f32(x: &[f32]) -> f32 {
    #[inline(always)]
    fn body(x: &[f32]) -> f32 {
        let mut acc = [0f32; 32];
        let mut chunks = x.chunks_exact(32);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(x: &[f32]) -> f32 {
            body(x)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(x: &[f32]) -> f32 {
            body(x)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { avx512(x) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(x) };
        }
    }
    body(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_and_cpu_lists_parse() {
        assert_eq!(parse_size("48K"), Some(48 << 10));
        assert_eq!(parse_size("480M"), Some(480 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(count_cpus("0-1"), 2);
        assert_eq!(count_cpus("0-3,8,10-11"), 7);
    }
}
