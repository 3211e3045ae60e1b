//! `--device cpu|cuda|cuda:N`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
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
