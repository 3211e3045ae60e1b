//! STREAM-like read bandwidth of this machine against buffer size: where each cache level
//! ends and what DRAM delivers, the numbers behind `generate --weights auto`
//! (docs/performance.md, "Inference"). `cargo bench --bench stream [-- MAX_MIB]`
//! (default: four times the last-level cache, at most 4 GiB).
use lors_lm::device::{cpu_caches, describe_caches, human_bytes, last_level_cache, read_bandwidth};

fn main() {
    let caches = cpu_caches();
    println!("caches: {}", describe_caches(&caches));
    let max_mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or_else(|| ((4 * last_level_cache().unwrap_or(256 << 20)) >> 20).min(4096));
    let threads = rayon::current_num_threads();
    println!("{:>10} | {:>12} | {:>12}", "buffer", "1 thread GB/s", format!("{threads} threads GB/s"));
    let mut kib = 256u64;
    while kib <= max_mib << 10 {
        let bytes = (kib << 10) as usize;
        // Enough passes to read ~2 GB per measurement, at least 3.
        let passes = ((2u64 << 30) / (kib << 10)).clamp(3, 2000) as usize;
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
        let single = one.install(|| read_bandwidth(bytes, passes));
        let all = read_bandwidth(bytes, passes);
        println!("{:>10} | {single:>12.1} | {all:>12.1}", human_bytes(kib << 10));
        kib = if kib < 4096 { kib * 2 } else { kib * 3 / 2 };
    }
}
